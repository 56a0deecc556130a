"""Shared helpers for the geomx examples: command line, data loading, model, training-loop plumbing
(kvstore set-up, key initialisation, the iteration loop) and evaluation.

The examples mirror the original GeoMX ones (``examples/utils.py`` there): the same flags, the same
CNN, the same contiguous per-worker data shards. Two deliberate differences:

- the default data set is scikit-learn's ``load_digits`` (bundled, so the examples run offline);
  MNIST / Fashion-MNIST are read from IDX files in ``--data-dir`` and are never downloaded;
- ``--eval-every`` lets long runs evaluate less often than on every iteration.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import logging
import os
import struct
import sys
import time
from typing import Iterable, Iterator, Optional, Sequence, Tuple

# Running from a source checkout: make the repository's geomx importable when it is not installed.
if importlib.util.find_spec("geomx") is None:
    sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mxnet as mx  # noqa: E402
import numpy as np  # noqa: E402
from mxnet import autograd, gluon  # noqa: E402
from tqdm import tqdm  # noqa: E402

#: Seed used by :func:`build_cnn` and the data shuffling, so that every worker builds the same
#: initial weights (the master worker's weights win anyway: the others pull them after ``init``).
DEFAULT_SEED = 0

DATASETS = ("digits", "mnist", "fashion-mnist")

IMAGE_SIZE = 28

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# Names used by the MNIST and Fashion-MNIST distributions (optionally with ".gz").
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


# --------------------------------------------------------------------------------------------------
# Command line and context
# --------------------------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


def build_parser(description: str = "geomx example") -> argparse.ArgumentParser:
    """Return the argument parser shared by all examples (scripts add their own flags to it)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-lr", "--learning-rate", type=float, default=0.01, help="learning rate (0.01)")
    parser.add_argument("-bs", "--batch-size", type=_positive_int, default=32, help="batch size (32)")
    parser.add_argument("-ds", "--data-slice-idx", type=_non_negative_int, default=0,
                        help="index of this worker's contiguous training shard (0)")
    parser.add_argument("-ep", "--epoch", type=_positive_int, default=5, help="number of epochs (5)")
    parser.add_argument("-sc", "--split-by-class", action="store_true",
                        help="sort the training set by label before sharding (non-IID shards)")
    parser.add_argument("-c", "--cpu", action="store_true", help="train on the CPU even if a GPU exists")
    parser.add_argument("--data-dir", default=None,
                        help="folder holding the IDX files for --dataset mnist / fashion-mnist")
    parser.add_argument("--dataset", choices=DATASETS, default="digits",
                        help="digits (scikit-learn, offline; default), mnist or fashion-mnist")
    parser.add_argument("--seed", type=_non_negative_int, default=DEFAULT_SEED,
                        help=f"seed of the initial weights and of the data order ({DEFAULT_SEED}); "
                             "every worker must use the same one")
    parser.add_argument("--eval-every", type=_positive_int, default=1,
                        help="evaluate on the test set every N iterations (1, as the original)")
    return parser


def get_context(use_cpu: bool) -> mx.Context:
    """``mx.cpu()`` if asked, else ``mx.gpu(0)`` when MXNet sees a GPU, else the CPU (with a note)."""
    if use_cpu:
        return mx.cpu()
    try:
        num_gpus = mx.context.num_gpus()
    except mx.base.MXNetError:
        num_gpus = 0
    if num_gpus > 0:
        return mx.gpu(0)
    print("No GPU found, training on the CPU.", flush=True)
    return mx.cpu()


# --------------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------------

class IDXFormatError(ValueError):
    """Raised when a file is not a well-formed IDX file."""


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (plain or gzip-compressed) into a numpy array.

    The header is two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, then one big-endian uint32 per dimension.
    The data follows in big-endian order. The result has native byte order. Raises
    :class:`IDXFormatError` on a bad magic number, an unknown type, or a size that does not match.
    """
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file name says
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise IDXFormatError(f"{path}: corrupt gzip data ({exc})") from exc
    if len(raw) < 4:
        raise IDXFormatError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    zero0, zero1, type_code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0:
        raise IDXFormatError(f"{path}: bad IDX magic number 0x{raw[:4].hex()} (must start with 0x0000)")
    if type_code not in _IDX_DTYPES:
        raise IDXFormatError(f"{path}: unknown IDX data type code 0x{type_code:02x}")
    if ndim == 0:
        raise IDXFormatError(f"{path}: IDX file declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise IDXFormatError(f"{path}: truncated IDX header ({len(raw)} of {header_len} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header_len])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header_len
    if actual != expected:
        what = "truncated" if actual < expected else "has trailing bytes"
        raise IDXFormatError(
            f"{path}: IDX data {what}: shape {tuple(shape)} of {dtype.name} needs {expected} bytes, "
            f"found {actual}")
    data = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=header_len)
    return data.reshape(shape).astype(dtype.newbyteorder("="))


def write_idx(path: str, array: np.ndarray, compress: Optional[bool] = None) -> None:
    """Write ``array`` as an IDX file (gzip-compressed if ``compress`` or the name ends in ``.gz``)."""
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}
    native = array.dtype.newbyteorder("=")
    if native not in codes:
        raise IDXFormatError(f"dtype {array.dtype} cannot be stored in an IDX file")
    if not 1 <= array.ndim <= 255:
        raise IDXFormatError(f"an IDX file holds 1 to 255 dimensions, not {array.ndim}")
    header = bytes([0, 0, codes[native], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(native.newbyteorder(">")).tobytes()
    if compress is None:
        compress = path.endswith(".gz")
    if compress:
        payload = gzip.compress(payload)
    with open(path, "wb") as f:
        f.write(payload)


def _find_idx(data_dir: str, stem: str, dataset: str) -> str:
    """Path of ``stem`` or ``stem.gz`` in ``data_dir`` (or its ``dataset`` subfolder)."""
    folders = [data_dir, os.path.join(data_dir, dataset), os.path.join(data_dir, dataset.replace("-", "_"))]
    for folder in folders:
        for name in (stem, stem + ".gz"):
            candidate = os.path.join(folder, name)
            if os.path.isfile(candidate):
                return candidate
    raise FileNotFoundError(
        f"{dataset}: missing file {stem} (or {stem}.gz) in {data_dir} (also looked in {folders[1]}); "
        f"place the {dataset} IDX files there, the examples never download data")


def _load_idx_dataset(dataset: str, data_dir: Optional[str]):
    if data_dir is None:
        raise FileNotFoundError(
            f"--dataset {dataset} needs --data-dir pointing at a folder with "
            f"{', '.join(IDX_FILES.values())} (optionally .gz); the examples never download data")
    arrays = {key: read_idx(_find_idx(data_dir, stem, dataset)) for key, stem in IDX_FILES.items()}
    out = []
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise IDXFormatError(
                f"{dataset} {split}: expected images N x H x W and N labels, got {images.shape} "
                f"and {labels.shape}")
        x = images.astype(np.float32)
        if images.dtype == np.uint8:
            x /= 255.0
        x = resize_bilinear(x, IMAGE_SIZE)[:, None, :, :]
        out += [np.ascontiguousarray(x, dtype=np.float32), labels.astype(np.int32)]
    return tuple(out)


# --------------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------------

def _interp_matrix(size_in: int, size_out: int) -> np.ndarray:
    """Matrix M (size_out x size_in) so that M @ x resamples x bilinearly (half-pixel centres)."""
    m = np.zeros((size_out, size_in), dtype=np.float64)
    scale = size_in / size_out
    for i in range(size_out):
        src = min(max((i + 0.5) * scale - 0.5, 0.0), size_in - 1)
        lo = int(np.floor(src))
        hi = min(lo + 1, size_in - 1)
        w = src - lo
        m[i, lo] += 1.0 - w
        m[i, hi] += w
    return m


def resize_bilinear(images: np.ndarray, size: int) -> np.ndarray:
    """Bilinearly resize a stack of images ``N x H x W`` to ``N x size x size`` (float32)."""
    n, h, w = images.shape
    if (h, w) == (size, size):
        return images.astype(np.float32)
    rows, cols = _interp_matrix(h, size), _interp_matrix(w, size)
    out = np.einsum("ih,nhw,jw->nij", rows, images.astype(np.float64), cols)
    return out.astype(np.float32)


def load_digits_arrays(seed: int = 0, test_size: int = 300):
    """scikit-learn's 8x8 digits upscaled to 1x28x28 in [0, 1]: ``(x_train, y_train, x_test, y_test)``.

    The train/test split is a fixed permutation (``seed``): 1497 training and 300 test images.
    """
    from sklearn.datasets import load_digits  # imported here: only this data set needs scikit-learn

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # pixel values are 0..16
    labels = digits.target.astype(np.int32)
    order = np.random.RandomState(seed).permutation(len(labels))
    test_idx, train_idx = order[:test_size], order[test_size:]
    x = np.clip(resize_bilinear(images, IMAGE_SIZE), 0.0, 1.0)[:, None, :, :]
    return x[train_idx], labels[train_idx], x[test_idx], labels[test_idx]


def load_arrays(dataset: str = "digits", data_dir: Optional[str] = None):
    """Whole data set as numpy arrays ``(x_train, y_train, x_test, y_test)``, images float32 NCHW."""
    if dataset == "digits":
        return load_digits_arrays()
    if dataset in ("mnist", "fashion-mnist"):
        return _load_idx_dataset(dataset, data_dir)
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


def shard_indices(labels: np.ndarray, num_all_workers: int, data_slice_idx: int,
                  split_by_class: bool = False) -> np.ndarray:
    """Indices of training shard ``data_slice_idx`` out of ``num_all_workers``.

    Each shard is a contiguous run of ``len(labels) // num_all_workers`` samples starting at
    ``data_slice_idx * that``; with ``split_by_class`` the indices are first (stably) sorted by
    label, so each shard holds only a few classes (non-IID).
    """
    if num_all_workers < 1:
        raise ValueError(f"num_all_workers must be >= 1, got {num_all_workers}")
    if not 0 <= data_slice_idx < num_all_workers:
        raise ValueError(f"data_slice_idx must be in [0, {num_all_workers}), got {data_slice_idx}")
    labels = np.asarray(labels)
    order = np.argsort(labels, kind="stable") if split_by_class else np.arange(len(labels))
    per_worker = len(labels) // num_all_workers
    if per_worker == 0:
        raise ValueError(f"{len(labels)} training samples cannot be split over {num_all_workers} workers")
    start = data_slice_idx * per_worker
    return order[start:start + per_worker]


def load_data(batch_size: int, num_all_workers: int = 1, data_slice_idx: int = 0,
              dataset: str = "digits", data_dir: Optional[str] = None, split_by_class: bool = False,
              shuffle: bool = True, test_batch_size: int = 1000, seed: int = DEFAULT_SEED,
              arrays: Optional[tuple] = None,
              ) -> Tuple[gluon.data.DataLoader, gluon.data.DataLoader]:
    """Train and test ``gluon.data.DataLoader`` for this worker's shard.

    The training loader covers :func:`shard_indices` of the training set (shuffled each epoch with a
    seeded generator when ``shuffle``); the test loader covers the whole test set. Images are float32
    ``N x 1 x 28 x 28`` in [0, 1]; labels are float32 class ids. ``arrays`` reuses the result of
    :func:`load_arrays` instead of loading ``dataset`` again.
    """
    x_train, y_train, x_test, y_test = arrays if arrays is not None else load_arrays(dataset, data_dir)
    idx = shard_indices(y_train, num_all_workers, data_slice_idx, split_by_class)
    train_set = gluon.data.ArrayDataset(x_train[idx], y_train[idx].astype(np.float32))
    test_set = gluon.data.ArrayDataset(x_test, y_test.astype(np.float32))
    if shuffle:
        sampler = _SeededRandomSampler(len(train_set), seed + data_slice_idx)
    else:
        sampler = gluon.data.SequentialSampler(len(train_set))
    train_loader = gluon.data.DataLoader(train_set, batch_size=batch_size, sampler=sampler, last_batch="keep")
    test_loader = gluon.data.DataLoader(test_set, batch_size=test_batch_size, shuffle=False)
    return train_loader, test_loader


class _SeededRandomSampler(gluon.data.Sampler):
    """A random permutation per epoch from a private generator (independent of global seeds)."""

    def __init__(self, length: int, seed: int):
        self._length = length
        self._rng = np.random.RandomState(seed)

    def __iter__(self):
        return iter(self._rng.permutation(self._length).tolist())

    def __len__(self):
        return self._length


# --------------------------------------------------------------------------------------------------
# Model and evaluation
# --------------------------------------------------------------------------------------------------

def build_cnn(ctx: Optional[mx.Context] = None, seed: int = DEFAULT_SEED) -> gluon.nn.Sequential:
    """The examples' CNN, Xavier-initialised from fixed seeds (same weights in every process).

    Conv2D(16, 5, relu) -> MaxPool(2, 2) -> Conv2D(32, 5, relu) -> MaxPool(2, 2)
    -> Dense(256, relu) -> Dense(128, relu) -> Dense(10). Shapes are resolved with one dummy forward
    pass, so ``param.data()`` is usable right away (``kv.init`` needs it).
    """
    ctx = ctx or mx.cpu()
    mx.random.seed(seed)
    np.random.seed(seed)
    net = gluon.nn.Sequential()
    with net.name_scope():
        net.add(gluon.nn.Conv2D(channels=16, kernel_size=5, activation="relu"),
                gluon.nn.MaxPool2D(pool_size=2, strides=2),
                gluon.nn.Conv2D(channels=32, kernel_size=5, activation="relu"),
                gluon.nn.MaxPool2D(pool_size=2, strides=2),
                gluon.nn.Dense(256, activation="relu"),
                gluon.nn.Dense(128, activation="relu"),
                gluon.nn.Dense(10))
    # Parameters are initialised on the CPU and copied to ctx, so the weights do not depend on ctx.
    net.initialize(mx.init.Xavier(), ctx=ctx)
    net(mx.nd.zeros((1, 1, IMAGE_SIZE, IMAGE_SIZE), ctx=ctx))
    return net


def evaluate(net: gluon.Block, test_data: Iterable[Sequence[mx.nd.NDArray]], ctx: mx.Context) -> float:
    """Top-1 accuracy of ``net`` over ``test_data`` (an iterable of ``(data, label)`` batches)."""
    correct, total = 0, 0
    for data, label in test_data:
        data = data.as_in_context(ctx)
        pred = net(data).argmax(axis=1).asnumpy().astype(np.int64)
        truth = label.asnumpy().astype(np.int64) if isinstance(label, mx.nd.NDArray) else np.asarray(label)
        correct += int((pred == truth.reshape(-1)).sum())
        total += truth.size
    return correct / max(total, 1)


class Reporter:
    """Evaluates ``net`` on ``test_data`` and prints the line the tests parse::

        [Time 1.234][Epoch 0][Iteration 10] Test Acc 0.9100

    The time is measured from the reporter's creation (create it right before the training loop).
    It remembers the last iteration it evaluated, so :meth:`report_final` evaluates once more only
    when training stopped on an iteration that was not evaluated.
    """

    LINE = "[Time %.3f][Epoch %d][Iteration %d] Test Acc %.4f"

    def __init__(self, net: gluon.Block, test_data: Iterable[Sequence[mx.nd.NDArray]], ctx: mx.Context,
                 kv: Optional[object] = None):
        self.net = net
        # geomx's kvstore: each accuracy also goes to the worker's metrics (kv.report_accuracy), which
        # the launcher's status page and Prometheus show. Native MXNet's kvstore has no such call.
        self.report_to = getattr(kv, "report_accuracy", None)
        self.test_data = test_data
        self.ctx = ctx
        self.start = time.time()
        self.last_iteration = 0

    def report(self, epoch: int, iteration: int) -> float:
        """Evaluate now, print the accuracy line and return the accuracy."""
        acc = evaluate(self.net, self.test_data, self.ctx)
        self.last_iteration = iteration
        print(self.LINE % (time.time() - self.start, epoch, iteration, acc), flush=True)
        if self.report_to is not None:
            self.report_to(acc)
        return acc

    def report_final(self, epoch: int, iteration: int) -> Optional[float]:
        """After training: :meth:`report` unless ``iteration`` was the last one reported (or is 0)."""
        if iteration and iteration != self.last_iteration:
            return self.report(epoch, iteration)
        return None


# --------------------------------------------------------------------------------------------------
# Training-loop plumbing
# --------------------------------------------------------------------------------------------------

def setup_logging() -> None:
    """INFO-level logging with timestamps (geomx logs its topology events through it)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def create_kvstore(kv_type: str = "dist_sync"):
    """``mx.kv.create(kv_type)`` and this process's role: ``(kv, is_master, num_all_workers)``.

    ``is_master`` is ``kv.is_master_worker`` (the one worker of the central party: it configures the
    global servers and initialises the keys, then leaves without training); ``num_all_workers`` is
    the number of training workers over all parties. A local store (single-process sanity runs) has
    no master worker and ``kv.num_workers`` workers.
    """
    kv = mx.kv.create(kv_type)
    is_master = bool(getattr(kv, "is_master_worker", False))
    num_all_workers = int(getattr(kv, "num_all_workers", kv.num_workers))
    return kv, is_master, num_all_workers


def init_keys(kv, params: Sequence[gluon.Parameter],
              buffers: Optional[Sequence[Optional[mx.nd.NDArray]]] = None) -> None:
    """Key ``i`` for ``params[i]``: every worker calls ``kv.init`` (the master worker's values win),
    then the workers other than the master pull them, so every worker starts from the same weights.

    ``buffers[i]``, when given and not None, is an array in key ``i``'s wire dtype (e.g. float16):
    the key is initialised with the parameter cast to it, pulled into it and cast back.
    """
    is_master = bool(getattr(kv, "is_master_worker", False))
    for idx, param in enumerate(params):
        buf = buffers[idx] if buffers is not None else None
        kv.init(idx, param.data() if buf is None else param.data().astype(buf.dtype))
        if is_master:
            continue
        if buf is None:
            kv.pull(idx, out=param.data())
        else:
            kv.pull(idx, out=buf)
            buf.astype("float32").copyto(param.data())


def load_shard(args: argparse.Namespace, num_all_workers: int, arrays: Optional[tuple] = None):
    """:func:`load_data` for this worker as the command line asks: ``(train_data, test_data)``."""
    return load_data(args.batch_size, num_all_workers, args.data_slice_idx, dataset=args.dataset,
                     data_dir=args.data_dir, split_by_class=args.split_by_class, arrays=arrays,
                     seed=args.seed)


def planned_iterations(train_data: Iterable, epochs: Optional[int], max_iters: int) -> Optional[int]:
    """How many iterations :func:`iterate` will yield, None where it cannot tell (endless, or data
    of unknown length)."""
    per_epoch = len(train_data) if hasattr(train_data, "__len__") else None
    whole = epochs * per_epoch if epochs is not None and per_epoch is not None else None
    if max_iters:
        return max_iters if whole is None else min(max_iters, whole)
    return whole


def iterate(train_data: Iterable, epochs: Optional[int] = None, max_iters: int = 0,
            progress: Optional[bool] = None, kv: Optional[object] = None) -> Iterator[Tuple[int, int, tuple]]:
    """Yield ``(epoch, iteration, batch)`` over ``epochs`` passes of ``train_data`` (endlessly when
    ``epochs`` is None); ``iteration`` counts from 1 and includes this batch.

    With ``max_iters`` (non-zero) it stops once ``iteration >= max_iters``, after that batch has been
    handled. ``progress`` shows a per-epoch progress bar on stderr (default: when stderr is a
    terminal). With geomx's ``kv``, each finished iteration and the planned number go to the worker's
    metrics (``kv.report_progress``), from which the launcher's progress line tells the time left.
    """
    if progress is None:
        progress = sys.stderr.isatty()
    report = getattr(kv, "report_progress", None)  # native MXNet's kvstore has no such call
    planned = planned_iterations(train_data, epochs, max_iters)
    iteration = 0
    epoch = 0
    while epochs is None or epoch < epochs:
        bar = tqdm(train_data, desc=f"epoch {epoch}", disable=not progress, file=sys.stderr, leave=False)
        try:
            for batch in bar:
                iteration += 1
                yield epoch, iteration, batch
                if report is not None:
                    report(iteration, planned)
                if max_iters and iteration >= max_iters:
                    return
        finally:
            bar.close()
        epoch += 1


def compute_gradients(net: gluon.Block, loss_fn: gluon.loss.Loss, data: mx.nd.NDArray,
                      label: mx.nd.NDArray, ctx: mx.Context, losses: Optional[list] = None) -> int:
    """Forward and backward pass of one batch on ``ctx``: fills ``param.grad()``; returns the batch size.
    With ``losses``, the batch's mean loss (an NDArray, not yet computed) is appended to it."""
    data = data.as_in_context(ctx)
    label = label.as_in_context(ctx)
    with autograd.record():
        loss = loss_fn(net(data), label)
    loss.backward()
    if losses is not None:
        losses.append(loss.mean())
    return data.shape[0]
