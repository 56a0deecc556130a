"""A training script that configures its own logging and ``sys.excepthook`` before it imports mxnet and
geomx, as an application would. After the store is made (the master worker) or one round trained (the
others) it checks that geomx left both as they were (prints ``MANNERS OK``, or ``MANNERS FAIL ...``);
after a barrier, ``--crash-slice`` then dies of an exception, which the application's hook reports
(``APP HOOK ...``) and the topology must still learn. Every log line through the application's handler
starts with ``APP``."""
import argparse
import logging
import sys

logging.basicConfig(level=logging.INFO, format="APP %(levelname)s %(name)s: %(message)s", stream=sys.stdout)
ROOT_HANDLERS = list(logging.getLogger().handlers)


def app_hook(kind, value, tb):
    print(f"APP HOOK {kind.__name__}: {value}", flush=True)


sys.excepthook = app_hook

import mxnet as mx  # noqa: E402

import geomx  # noqa: E402,F401 - registers the store


def manners() -> str:
    """``MANNERS OK``, or what geomx changed of the application's logging and exception hook."""
    geomx_logger = logging.getLogger("geomx")
    problems = []
    if sys.excepthook is not app_hook:
        problems.append(f"sys.excepthook is {sys.excepthook!r}")
    if logging.getLogger().handlers != ROOT_HANDLERS:
        problems.append(f"root handlers {logging.getLogger().handlers!r}")
    if geomx_logger.handlers or not geomx_logger.propagate or geomx_logger.level != logging.NOTSET:
        problems.append(f"geomx logger: handlers {geomx_logger.handlers!r}, propagate {geomx_logger.propagate}, "
                        f"level {geomx_logger.level}")
    return "MANNERS FAIL " + "; ".join(problems) if problems else "MANNERS OK"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--slice", type=int, required=True)
    p.add_argument("--crash-slice", type=int, default=-1)
    args = p.parse_args()
    kv = mx.kv.create("dist_sync")
    if kv.is_master_worker:
        # (Before init: the training workers' round, so the crash below, cannot come before it.)
        print(manners(), flush=True)
    kv.init(0, mx.nd.zeros((4,)))
    if kv.is_master_worker:
        return 0
    out = mx.nd.zeros((4,))
    kv.pushpull(0, mx.nd.ones((4,)), out=out)
    if out.asnumpy().tolist() != [float(kv.num_all_workers)] * 4:
        print(f"MISMATCH {out.asnumpy().tolist()}", flush=True)
        return 1
    result = manners()
    print(result, flush=True)
    kv.barrier()  # every training worker has checked before one of them crashes
    if args.slice == args.crash_slice:
        raise RuntimeError("injected failure")
    kv.barrier()
    return 0 if result == "MANNERS OK" else 1


if __name__ == "__main__":
    sys.exit(main())
