"""Test and benchmark harness: the emulated WAN (network namespaces, tbf-capped links, a delaying relay).

Not part of the runtime: ``import geomx`` never imports this package (a unit test checks), and only
``geomx-launch --wan``, the tests and the benchmarks reach it.
"""
