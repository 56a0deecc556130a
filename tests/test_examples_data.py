"""Tests for the examples' helpers (examples/utils.py): IDX reader, data sharding, seeded model."""

import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

EXAMPLES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")

# examples/utils.py imports mxnet (the examples are MXNet scripts): where MXNet is not installed (the core
# alone) the module is skipped.
pytest.importorskip("mxnet")

# examples/ only while utils is imported: left on sys.path, a folder of it would shadow a package of that name
# that is not installed (an `import` would find a namespace package) for the rest of the session.
sys.path.insert(0, EXAMPLES_DIR)
try:
    import utils  # noqa: E402
finally:
    sys.path.remove(EXAMPLES_DIR)


def _idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    """IDX encoding written independently of utils.write_idx (uint8 by default)."""
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    return header + array.tobytes()


def _write(path, payload: bytes, gz: bool) -> str:
    path = str(path) + (".gz" if gz else "")
    with open(path, "wb") as f:
        f.write(gzip.compress(payload) if gz else payload)
    return path


# --------------------------------------------------------------------------------------------------
# IDX reader
# --------------------------------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_uint8_images_and_labels(tmp_path, gz):
    rng = np.random.RandomState(1)
    images = rng.randint(0, 256, size=(7, 28, 28)).astype(np.uint8)
    labels = rng.randint(0, 10, size=(7,)).astype(np.uint8)
    img_path = _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(images), gz)
    lbl_path = _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(labels), gz)

    got_images, got_labels = utils.read_idx(img_path), utils.read_idx(lbl_path)
    assert got_images.dtype == np.uint8 and got_images.shape == (7, 28, 28)
    assert got_labels.dtype == np.uint8 and got_labels.shape == (7,)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


@pytest.mark.unit
def test_read_idx_gzip_detected_by_content_not_name(tmp_path):
    data = np.arange(12, dtype=np.uint8).reshape(3, 4)
    path = tmp_path / "no-extension"
    path.write_bytes(gzip.compress(_idx_bytes(data)))
    np.testing.assert_array_equal(utils.read_idx(str(path)), data)


@pytest.mark.unit
@pytest.mark.parametrize("dtype,code", [(">i2", 0x0B), (">i4", 0x0C), (">f4", 0x0D), (">f8", 0x0E),
                                        ("i1", 0x09)])
def test_read_idx_other_dtypes_big_endian(tmp_path, dtype, code):
    data = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    path = _write(tmp_path / "x.idx", _idx_bytes(data, code), gz=False)
    got = utils.read_idx(path)
    assert got.shape == (2, 3, 4)
    assert got.dtype.isnative
    np.testing.assert_array_equal(got, data.astype(np.dtype(dtype).newbyteorder("=")))


@pytest.mark.unit
@pytest.mark.parametrize("gz", [False, True])
def test_write_idx_round_trip(tmp_path, gz):
    data = np.random.RandomState(0).rand(5, 3).astype(np.float32)
    path = str(tmp_path / ("f.idx.gz" if gz else "f.idx"))
    utils.write_idx(path, data)
    with open(path, "rb") as f:
        assert (f.read(2) == b"\x1f\x8b") == gz
    np.testing.assert_array_equal(utils.read_idx(path), data)


@pytest.mark.unit
def test_read_idx_bad_magic(tmp_path):
    payload = bytearray(_idx_bytes(np.zeros((2, 2), dtype=np.uint8)))
    payload[0] = 0x12
    path = _write(tmp_path / "bad", bytes(payload), gz=False)
    with pytest.raises(utils.IDXFormatError, match="magic"):
        utils.read_idx(path)


@pytest.mark.unit
def test_read_idx_unknown_type_code(tmp_path):
    path = _write(tmp_path / "bad", _idx_bytes(np.zeros((2, 2), dtype=np.uint8), type_code=0x42), gz=False)
    with pytest.raises(utils.IDXFormatError, match="type code 0x42"):
        utils.read_idx(path)


@pytest.mark.unit
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated_data(tmp_path, gz):
    payload = _idx_bytes(np.ones((4, 5, 5), dtype=np.uint8))
    path = _write(tmp_path / "short", payload[:-3], gz)
    with pytest.raises(utils.IDXFormatError, match="truncated"):
        utils.read_idx(path)


@pytest.mark.unit
def test_read_idx_truncated_header_and_empty(tmp_path):
    header_only = _idx_bytes(np.ones((4, 5, 5), dtype=np.uint8))[:9]  # 3 dims declared, 1.25 given
    with pytest.raises(utils.IDXFormatError, match="truncated IDX header"):
        utils.read_idx(_write(tmp_path / "h", header_only, gz=False))
    with pytest.raises(utils.IDXFormatError, match="too short"):
        utils.read_idx(_write(tmp_path / "e", b"", gz=False))


@pytest.mark.unit
def test_read_idx_trailing_bytes(tmp_path):
    path = _write(tmp_path / "long", _idx_bytes(np.ones((3,), dtype=np.uint8)) + b"\x00", gz=False)
    with pytest.raises(utils.IDXFormatError, match="trailing"):
        utils.read_idx(path)


@pytest.mark.unit
def test_read_idx_corrupt_gzip(tmp_path):
    blob = gzip.compress(_idx_bytes(np.ones((50,), dtype=np.uint8)))
    path = tmp_path / "broken.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(utils.IDXFormatError, match="gzip"):
        utils.read_idx(str(path))


# --------------------------------------------------------------------------------------------------
# Data sets and sharding
# --------------------------------------------------------------------------------------------------

def _make_fake_mnist(folder, n_train=40, n_test=8, gz=True):
    rng = np.random.RandomState(3)
    arrays = {
        "train_images": rng.randint(0, 256, size=(n_train, 28, 28)).astype(np.uint8),
        "train_labels": (np.arange(n_train)[::-1] % 10).astype(np.uint8),
        "test_images": rng.randint(0, 256, size=(n_test, 28, 28)).astype(np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for key, stem in utils.IDX_FILES.items():
        _write(os.path.join(folder, stem), _idx_bytes(arrays[key]), gz)
    return arrays


def _collect(loader):
    xs, ys = zip(*[(x.asnumpy(), y.asnumpy()) for x, y in loader])
    return np.concatenate(xs), np.concatenate(ys)


@pytest.mark.unit
@pytest.mark.parametrize("gz", [False, True])
def test_load_arrays_mnist_from_idx(tmp_path, gz):
    raw = _make_fake_mnist(str(tmp_path), gz=gz)
    x_train, y_train, x_test, y_test = utils.load_arrays("mnist", str(tmp_path))
    assert x_train.shape == (40, 1, 28, 28) and x_train.dtype == np.float32
    assert x_test.shape == (8, 1, 28, 28)
    np.testing.assert_allclose(x_train[:, 0], raw["train_images"] / 255.0, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(y_train, raw["train_labels"])
    np.testing.assert_array_equal(y_test, raw["test_labels"])


@pytest.mark.unit
def test_load_arrays_fashion_mnist_in_subfolder(tmp_path):
    sub = tmp_path / "fashion-mnist"
    sub.mkdir()
    raw = _make_fake_mnist(str(sub), gz=False)
    _, y_train, _, _ = utils.load_arrays("fashion-mnist", str(tmp_path))
    np.testing.assert_array_equal(y_train, raw["train_labels"])


@pytest.mark.unit
def test_missing_idx_file_names_it(tmp_path):
    _make_fake_mnist(str(tmp_path))
    os.remove(os.path.join(str(tmp_path), "t10k-labels-idx1-ubyte.gz"))
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        utils.load_arrays("mnist", str(tmp_path))


@pytest.mark.unit
def test_mnist_without_data_dir_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        utils.load_arrays("mnist", None)


@pytest.mark.unit
def test_digits_arrays():
    x_train, y_train, x_test, y_test = utils.load_digits_arrays()
    assert x_train.shape == (1497, 1, 28, 28) and x_test.shape == (300, 1, 28, 28)
    assert x_train.dtype == np.float32
    assert 0.0 <= x_train.min() and x_train.max() <= 1.0 and x_train.max() > 0.9
    assert set(np.unique(y_train)) == set(range(10))
    # The split is fixed: the same arrays every time.
    again = utils.load_digits_arrays()
    np.testing.assert_array_equal(again[0], x_train)
    np.testing.assert_array_equal(again[3], y_test)


@pytest.mark.unit
def test_resize_bilinear_constant_and_range():
    flat = np.full((2, 8, 8), 0.25, dtype=np.float32)
    np.testing.assert_allclose(utils.resize_bilinear(flat, 28), 0.25, atol=1e-6)
    ramp = np.tile(np.arange(8, dtype=np.float32), (1, 8, 1))
    out = utils.resize_bilinear(ramp, 28)[0]
    assert out.shape == (28, 28)
    assert np.all(np.diff(out[0]) >= 0)  # a horizontal ramp stays monotone
    assert out.min() == 0.0 and out.max() == 7.0


@pytest.mark.unit
def test_shard_indices_contiguous_and_disjoint():
    labels = np.arange(103) % 10
    shards = [utils.shard_indices(labels, 4, i) for i in range(4)]
    for i, idx in enumerate(shards):
        np.testing.assert_array_equal(idx, np.arange(i * 25, (i + 1) * 25))
    flat = np.concatenate(shards)
    assert len(set(flat.tolist())) == 100  # disjoint; the last 3 samples are left out


@pytest.mark.unit
def test_shard_indices_split_by_class_sorts_by_label():
    labels = np.random.RandomState(0).randint(0, 10, size=200)
    shards = [utils.shard_indices(labels, 4, i, split_by_class=True) for i in range(4)]
    flat = np.concatenate(shards)
    assert len(set(flat.tolist())) == 200
    # Concatenated shards walk the data set in label order (stable within a label).
    np.testing.assert_array_equal(flat, np.argsort(labels, kind="stable"))
    assert all(np.all(np.diff(labels[s]) >= 0) for s in shards)
    # Non-IID: each shard sees only a few classes.
    assert all(len(np.unique(labels[s])) <= 4 for s in shards)


@pytest.mark.unit
def test_shard_indices_rejects_bad_index():
    with pytest.raises(ValueError):
        utils.shard_indices(np.zeros(10), 4, 4)
    with pytest.raises(ValueError):
        utils.shard_indices(np.zeros(3), 4, 0)


@pytest.mark.unit
def test_load_data_shards_of_four_workers():
    x_train, y_train, _, y_test = utils.load_digits_arrays()
    per = len(y_train) // 4
    seen = []
    for ds in range(4):
        train, test = utils.load_data(32, num_all_workers=4, data_slice_idx=ds, shuffle=False)
        x, y = _collect(train)
        assert x.shape == (per, 1, 28, 28) and x.dtype == np.float32
        np.testing.assert_array_equal(x, x_train[ds * per:(ds + 1) * per])
        np.testing.assert_array_equal(y, y_train[ds * per:(ds + 1) * per])
        seen.append(np.arange(ds * per, (ds + 1) * per))
        _, ty = _collect(test)
        np.testing.assert_array_equal(ty, y_test)  # every worker evaluates on the whole test set
    assert len(set(np.concatenate(seen).tolist())) == 4 * per


@pytest.mark.unit
def test_load_data_shuffled_shard_has_same_samples():
    _, y_train, _, _ = utils.load_digits_arrays()
    per = len(y_train) // 4
    train, _ = utils.load_data(32, num_all_workers=4, data_slice_idx=1)
    _, y = _collect(train)
    assert len(y) == per
    assert not np.array_equal(y, y_train[per:2 * per])  # shuffled ...
    np.testing.assert_array_equal(np.sort(y), np.sort(y_train[per:2 * per]))  # ... same shard


@pytest.mark.unit
def test_load_data_split_by_class_fake_mnist(tmp_path):
    raw = _make_fake_mnist(str(tmp_path))
    labels = raw["train_labels"]
    for ds in range(4):
        train, _ = utils.load_data(4, num_all_workers=4, data_slice_idx=ds, dataset="mnist",
                                   data_dir=str(tmp_path), split_by_class=True, shuffle=False)
        _, y = _collect(train)
        expected = labels[np.argsort(labels, kind="stable")[ds * 10:(ds + 1) * 10]]
        np.testing.assert_array_equal(y, expected)
        assert np.all(np.diff(y) >= 0)


# --------------------------------------------------------------------------------------------------
# Seeded model
# --------------------------------------------------------------------------------------------------

_WEIGHT_DIGEST = r"""
import hashlib, sys
sys.path.insert(0, sys.argv[1])
import mxnet as mx
import numpy as np
import utils
if len(sys.argv) > 2:
    mx.random.seed(1234); np.random.seed(1234); mx.nd.random.uniform(shape=(1000,)).asnumpy()
net = utils.build_cnn(mx.cpu())
h = hashlib.sha256()
for name, p in net.collect_params().items():
    h.update(p.data().asnumpy().tobytes())
print(h.hexdigest())
"""


def _weights_digest(*extra):
    out = subprocess.run([sys.executable, "-c", _WEIGHT_DIGEST, EXAMPLES_DIR, *extra],
                         capture_output=True, text=True, timeout=120, check=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.system
def test_build_cnn_identical_weights_across_processes():
    first = _weights_digest()
    second = _weights_digest("disturb-global-rng-first")  # build_cnn reseeds, so this does not matter
    assert len(first) == 64
    assert first == second


@pytest.mark.unit
def test_build_cnn_architecture_and_seed_dependence():
    import mxnet as mx

    net = utils.build_cnn(mx.cpu())
    shapes = [p.data().shape for p in net.collect_params().values()]
    assert shapes == [(16, 1, 5, 5), (16,), (32, 16, 5, 5), (32,), (256, 512), (256,), (128, 256), (128,),
                      (10, 128), (10,)]
    out = net(mx.nd.zeros((2, 1, 28, 28)))
    assert out.shape == (2, 10)
    same = utils.build_cnn(mx.cpu())
    other = utils.build_cnn(mx.cpu(), seed=utils.DEFAULT_SEED + 1)
    w = list(net.collect_params().values())[0].data().asnumpy()
    np.testing.assert_array_equal(w, list(same.collect_params().values())[0].data().asnumpy())
    assert not np.array_equal(w, list(other.collect_params().values())[0].data().asnumpy())


@pytest.mark.unit
def test_evaluate_counts_correct_predictions():
    import mxnet as mx

    class Fixed(mx.gluon.Block):
        def forward(self, x):
            return mx.nd.one_hot(x[:, 0, 0, 0].astype("int32"), 10)

    data = mx.nd.array(np.array([1, 2, 3, 4], dtype=np.float32).reshape(4, 1, 1, 1))
    labels = mx.nd.array([1, 2, 0, 4])
    assert utils.evaluate(Fixed(), [(data, labels)], mx.cpu()) == pytest.approx(0.75)
