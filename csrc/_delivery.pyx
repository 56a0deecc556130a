# distutils: language = c++
# cython: language_level=3, boundscheck=False, wraparound=False
"""Writing pulled values into MXNet arrays as asynchronous engine operations, without Python in the
engine's threads.

A pull pushes one operation onto MXNet's engine (``MXEnginePushAsyncND``) that holds the write
dependency of the ``out`` array. Two things must happen before it completes, in either order: the
engine runs the operation (``run``, in an engine thread: it only records the engine's completion
callback) and the reply arrives (:meth:`Delivery.provide`, in geomx's I/O thread). Whichever comes
second copies the reply into ``out``'s memory and completes the operation; every later use of
``out`` (the next forward pass, ``asnumpy``) waits for it, nothing else does. This is how MXNet's own
``dist`` store completes its pulls from ps-lite's receiving thread, and it replaces a custom operator
whose Python callbacks cost ~0.8 ms of CPU per pull (benchmarks/bench_pushpull.py, docs/Benchmarks.md).

A failed request completes the operation with an error: MXNet rethrows it to whoever waits on ``out``
(``waitall``, ``asnumpy``) as an ``MXNetError`` that carries geomx's message.
"""
import numpy as np

from libc.stdint cimport uintptr_t
from libcpp.string cimport string

cdef extern from *:
    """
    #include <cstring>
    #include <mutex>
    #include <stdexcept>
    #include <string>

    namespace dmlc {
    // The engine copies this into the exception it rethrows to the array's waiters. Same definition
    // as dmlc-core's (include/dmlc/logging.h in MXNet 1.9.1's wheel): a std::runtime_error and nothing else.
    struct Error : public std::runtime_error {
      explicit Error(const std::string &s) : std::runtime_error(s) {}
    };
    }  // namespace dmlc

    // MXNet's engine::CallbackOnComplete (include/mxnet/engine.h): what the engine hands the
    // operation to call when it is done; valid to copy and call from any thread.
    struct geomx_on_complete {
      void (*callback)(void *engine, void *param, const dmlc::Error *error);
      void *engine;
      void *param;
    };

    // MXNDArrayToDLPack / MXNDArrayCallDLPackDeleter, looked up in libmxnet by the Python side, and
    // mxnet::NDArray::InvalidateMKLDNNData() (exported by MKLDNN builds; null elsewhere): what MXNet's
    // own operators call on an output they overwrite whole, so that it is in the default layout again.
    typedef int (*geomx_to_dlpack_t)(void *ndarray, void **dlpack);
    typedef int (*geomx_dlpack_delete_t)(void *dlpack);
    typedef void (*geomx_invalidate_t)(void *ndarray);
    static geomx_to_dlpack_t geomx_to_dlpack = nullptr;
    static geomx_dlpack_delete_t geomx_dlpack_delete = nullptr;
    static geomx_invalidate_t geomx_invalidate_mkldnn = nullptr;

    // The array's data pointer in the default layout, or null. This operation holds the array's write
    // dependency and overwrites every byte, so an MKLDNN layout (the weight of a convolution that ran
    // in inference mode is re-laid out by an engine write queued during that pass, which can come
    // between the pull's issue and this point) is dropped rather than converted.
    static void *geomx_data_pointer(void *ndarray, void **dl) {
      if (geomx_to_dlpack == nullptr) return nullptr;
      if (geomx_to_dlpack(ndarray, dl) != 0 || *dl == nullptr) {
        if (geomx_invalidate_mkldnn == nullptr) return nullptr;
        geomx_invalidate_mkldnn(ndarray);
        *dl = nullptr;
        if (geomx_to_dlpack(ndarray, dl) != 0 || *dl == nullptr) return nullptr;
      }
      // DLManagedTensor starts with DLTensor {void *data; ...; uint64_t byte_offset} (dlpack.h).
      return *reinterpret_cast<void **>(*dl);
    }

    enum { GEOMX_EMPTY = 0, GEOMX_RUNNING = 1, GEOMX_READY = 2, GEOMX_DONE = 3 };

    struct geomx_slot {
      std::mutex mu;
      int state = GEOMX_EMPTY;
      geomx_on_complete done{};
      void *ndarray = nullptr;    // the out array's handle: its data pointer is read when writing
      size_t nbytes = 0;
      const void *src = nullptr;  // the reply (kept alive by the Python side until GEOMX_DONE)
      bool failed = false;
      std::string error;
    };

    // Both halves are here (the engine runs the operation and the reply arrived): write and complete.
    static void geomx_finish(geomx_slot *s) {
      std::string error = s->error;
      bool failed = s->failed;
      if (!failed) {
        // The data pointer now, while this operation holds the array's write dependency.
        void *dl = nullptr;
        void *data = geomx_data_pointer(s->ndarray, &dl);
        if (data == nullptr) {
          failed = true;
          error = "geomx: the pulled array has no plain data pointer (an MKLDNN layout this MXNet "
                  "build cannot reset); pull into an array that no inference pass uses";
        } else {
          std::memcpy(data, s->src, s->nbytes);
        }
        if (dl != nullptr) geomx_dlpack_delete(dl);
      }
      geomx_on_complete done = s->done;
      {
        std::lock_guard<std::mutex> lock(s->mu);
        s->state = GEOMX_DONE;
      }
      if (failed) {
        dmlc::Error err(error);
        done.callback(done.engine, done.param, &err);
      } else {
        done.callback(done.engine, done.param, nullptr);
      }
    }

    // The engine runs the operation (an engine thread).
    static void geomx_run(void *run_ctx, void *on_complete, void *param) {
      geomx_slot *s = static_cast<geomx_slot *>(param);
      bool ready;
      {
        std::lock_guard<std::mutex> lock(s->mu);
        s->done = *static_cast<geomx_on_complete *>(on_complete);
        ready = s->state == GEOMX_READY;
        if (!ready) s->state = GEOMX_RUNNING;
      }
      if (ready) geomx_finish(s);
    }

    // The reply arrived, or the request failed (geomx's I/O thread).
    static void geomx_provide(geomx_slot *s, const void *src, bool failed, const std::string &error) {
      bool running;
      {
        std::lock_guard<std::mutex> lock(s->mu);
        s->src = src;
        s->failed = failed;
        s->error = error;
        running = s->state == GEOMX_RUNNING;
        if (!running) s->state = GEOMX_READY;
      }
      if (running) geomx_finish(s);
    }

    static int geomx_state(geomx_slot *s) {
      std::lock_guard<std::mutex> lock(s->mu);
      return s->state;
    }

    static uintptr_t geomx_run_address() { return reinterpret_cast<uintptr_t>(&geomx_run); }
    static void geomx_set_api(uintptr_t to_dlpack, uintptr_t dlpack_delete, uintptr_t invalidate) {
      geomx_to_dlpack = reinterpret_cast<geomx_to_dlpack_t>(to_dlpack);
      geomx_dlpack_delete = reinterpret_cast<geomx_dlpack_delete_t>(dlpack_delete);
      geomx_invalidate_mkldnn = reinterpret_cast<geomx_invalidate_t>(invalidate);
    }
    """
    cdef int GEOMX_DONE
    cdef cppclass geomx_slot:
        void *ndarray
        size_t nbytes
    void geomx_provide(geomx_slot *s, const void *src, bint failed, const string &error) nogil
    int geomx_state(geomx_slot *s) nogil
    uintptr_t geomx_run_address()
    void geomx_set_api(uintptr_t to_dlpack, uintptr_t dlpack_delete, uintptr_t invalidate)


def set_api(uintptr_t to_dlpack, uintptr_t dlpack_delete, uintptr_t invalidate_mkldnn=0):
    """Give the module libmxnet's ``MXNDArrayToDLPack``, ``MXNDArrayCallDLPackDeleter`` and, in an
    MKLDNN build, ``mxnet::NDArray::InvalidateMKLDNNData`` (0 where there is none)."""
    geomx_set_api(to_dlpack, dlpack_delete, invalidate_mkldnn)


#: Address of the ``EngineAsyncFunc`` to pass to ``MXEnginePushAsyncND`` with a slot as its parameter.
RUN_ADDRESS = geomx_run_address()


cdef class Delivery:
    """One pull's write into one array: pass :attr:`param` with :data:`RUN_ADDRESS` to the engine, then
    call :meth:`provide` (or :meth:`fail`) once; keep the object until :attr:`done`."""
    cdef geomx_slot *slot
    cdef object value  # the reply, referenced until the copy is done
    cdef object out    # the array, likewise
    cdef bint provided

    def __cinit__(self, out, uintptr_t handle, size_t nbytes):
        self.slot = new geomx_slot()
        self.slot.ndarray = <void *>handle
        self.slot.nbytes = nbytes
        self.out = out
        self.value = None
        self.provided = False

    def __dealloc__(self):
        # Only freed once done (the owner keeps it until then) or never pushed to the engine.
        del self.slot

    @property
    def param(self):
        return <uintptr_t>self.slot

    @property
    def done(self):
        return geomx_state(self.slot) == GEOMX_DONE

    def provide(self, value):
        """``value``: a C-contiguous array of exactly the array's bytes."""
        flat = np.ascontiguousarray(value).reshape(-1).view(np.uint8)
        cdef const unsigned char[::1] view = flat
        if self.provided:
            raise RuntimeError("a delivery is provided once")
        if <size_t>view.shape[0] != self.slot.nbytes:
            raise ValueError(f"reply of {view.shape[0]} bytes for an array of {self.slot.nbytes}")
        self.provided = True
        self.value = flat  # whatever buffer view points into stays alive until the copy
        cdef const void *src = &view[0] if view.shape[0] else NULL
        cdef string empty
        with nogil:
            geomx_provide(self.slot, src, False, empty)

    def fail(self, str message):
        if self.provided:
            raise RuntimeError("a delivery is provided once")
        self.provided = True
        cdef string error = message.encode("utf-8", "replace")
        with nogil:
            geomx_provide(self.slot, NULL, True, error)
