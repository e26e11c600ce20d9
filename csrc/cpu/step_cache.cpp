// The per-step check of the optimizer's step cache (NOTE [step cache] in
// largedet_kernels/optimizer.py), over the flat parameter list in one call: ~20 ns a tensor,
// where the same checks as map() passes in Python cost ~0.7 us. Plain CPython API on purpose:
// a torch.ops call would convert the list to tensors first, which costs more than the checks.
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include "../python_module.h"

#include <cstdint>

namespace largedet {
namespace {

// One row per parameter of the flat list: what the cache was built from.
enum Column : int64_t {
  kDistributed = 0,  // a DTensor: watched through its local tensor
  kHasGrad,
  kParamAddress,
  kParamStrides,
  kGradAddress,
  kGradDtype,
  kGradStrides,
  kVersion,  // the parameter's version counter as the last step left it (record_versions), or -1: unwatched
  kColumns,
};
// What check_step_cache finds.
enum Verdict : long { kUnchanged = 0, kNewGradientAddresses = 1, kRebuild = 2 };

// Sizes and strides as one number (FNV-1a): a change of layout changes it.
int64_t layout_hash(const at::Tensor& t) {
  uint64_t h = 1469598103934665603ull;
  const auto mix = [&h](int64_t v) { h = (h ^ static_cast<uint64_t>(v)) * 1099511628211ull; };
  mix(t.dim());
  for (const int64_t v : t.sizes()) mix(v);
  for (const int64_t v : t.strides()) mix(v);
  return static_cast<int64_t>(h);
}

int64_t address(const at::Tensor& t) { return reinterpret_cast<int64_t>(t.data_ptr()); }

bool plain_dense(const at::Tensor& t) { return t.layout() == at::kStrided && t.has_storage(); }

// The row of a parameter whose local tensor is x and gradient g (undefined for none); false when either is of a
// kind the cache does not watch.
bool describe(const at::Tensor& x, const at::Tensor& g, int64_t* row) {
  row[kHasGrad] = g.defined();
  if (!plain_dense(x) || (g.defined() && !plain_dense(g))) return false;
  row[kParamAddress] = address(x);
  row[kParamStrides] = layout_hash(x);
  row[kGradAddress] = g.defined() ? address(g) : 0;
  row[kGradDtype] = g.defined() ? static_cast<int64_t>(g.scalar_type()) : -1;
  row[kGradStrides] = g.defined() ? layout_hash(g) : 0;
  return true;
}

// The version counter of a parameter (of the DTensor itself, for one: what an in-place op on it advances).
int64_t version(PyObject* p) {
  const at::Tensor& t = THPVariable_Unpack(p);
  return t.is_inference() ? 0 : static_cast<int64_t>(t.unsafeGetTensorImpl()->version_counter().current_version());
}

PyObject* local_tensor_name() {
  static PyObject* name = PyUnicode_InternFromString("_local_tensor");
  return name;
}

// A DTensor's local tensor as a new reference (DTensor._local_tensor, what to_local() returns under
// no_grad), or a plain tensor itself when `distributed` is false; nullptr, no error set, for anything else.
PyObject* local_of(PyObject* t, bool distributed) {
  PyObject* local = distributed ? PyObject_GetAttr(t, local_tensor_name()) : (Py_INCREF(t), t);
  if (local == nullptr) PyErr_Clear();
  if (local != nullptr && !THPVariable_Check(local)) Py_CLEAR(local);
  return local;
}

// The local tensor and the local gradient of parameter p, as new references (grad is Py_None for none).
bool locals_of(PyObject* p, bool distributed, PyObject** x, PyObject** grad) {
  *x = local_of(p, distributed);
  if (*x == nullptr) return false;
  const at::Tensor& g = THPVariable_Unpack(p).grad();
  if (!g.defined()) {
    *grad = Py_None;
    Py_INCREF(Py_None);
    return true;
  }
  PyObject* wrapped = THPVariable_Wrap(g);
  *grad = wrapped == nullptr ? nullptr : local_of(wrapped, distributed);
  Py_XDECREF(wrapped);
  if (*grad == nullptr) {
    PyErr_Clear();
    Py_DECREF(*x);
    return false;
  }
  return true;
}

const at::Tensor& tensor_or_undefined(PyObject* t) {
  static const at::Tensor undefined;
  return t == Py_None ? undefined : THPVariable_Unpack(t);
}

bool tensor_list(PyObject* list) {
  if (!PyList_Check(list)) return false;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(list); ++i) {
    if (!THPVariable_Check(PyList_GET_ITEM(list, i))) return false;
  }
  return true;
}

// step_cache_snapshot(params: list[Tensor], snapshot: int64 CPU tensor [len(params), kColumns]) -> bool:
// fills the snapshot; False when a tensor cannot be watched here (the Python check then runs).
PyObject* step_cache_snapshot(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 2 || !tensor_list(args[0]) || !THPVariable_Check(args[1])) {
    PyErr_SetString(PyExc_TypeError, "step_cache_snapshot(params: list of tensors, snapshot: Tensor)");
    return nullptr;
  }
  const at::Tensor& snapshot = THPVariable_Unpack(args[1]);
  const Py_ssize_t n = PyList_GET_SIZE(args[0]);
  if (!snapshot.is_cpu() || snapshot.scalar_type() != at::kLong || !snapshot.is_contiguous() ||
      snapshot.numel() != n * kColumns) {
    PyErr_SetString(PyExc_ValueError, "step_cache_snapshot: the snapshot must be a contiguous CPU int64 [n, 8]");
    return nullptr;
  }
  int64_t* rows = snapshot.data_ptr<int64_t>();
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* p = PyList_GET_ITEM(args[0], i);
    const int distributed = PyObject_HasAttr(p, local_tensor_name());
    PyObject *x, *grad;
    if (!locals_of(p, distributed, &x, &grad)) Py_RETURN_FALSE;
    rows[i * kColumns + kDistributed] = distributed;
    rows[i * kColumns + kVersion] = -1;
    const bool ok = describe(THPVariable_Unpack(x), tensor_or_undefined(grad), rows + i * kColumns);
    Py_DECREF(x);
    Py_DECREF(grad);
    if (!ok) Py_RETURN_FALSE;
  }
  Py_RETURN_TRUE;
}

// check_step_cache(params: list, cached: list, locals: list, snapshot) -> (int, list | None, list | None):
// kUnchanged or kNewGradientAddresses (the snapshot then holds the new ones) with the local gradients of the
// parameters that have one, in order, whose version counters it advances for the step, and the positions of
// the parameters written since the last step by anything else (their version counters moved); or kRebuild,
// None, None (a parameter, its local tensor, storage or layout, or a gradient's presence, dtype or layout
// changed). `cached` and `locals` are the parameters and their local tensors when the snapshot was taken.
PyObject* check_step_cache(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 4 || !PyList_Check(args[0]) || !PyList_Check(args[1]) || !PyList_Check(args[2]) ||
      !THPVariable_Check(args[3])) {
    PyErr_SetString(PyExc_TypeError, "check_step_cache(params: list, cached: list, locals: list, snapshot: Tensor)");
    return nullptr;
  }
  PyObject* params = args[0];
  PyObject* cached = args[1];
  PyObject* cached_locals = args[2];
  const at::Tensor& snapshot = THPVariable_Unpack(args[3]);
  const Py_ssize_t n = PyList_GET_SIZE(params);
  const auto rebuild = [] { return Py_BuildValue("(lOO)", static_cast<long>(kRebuild), Py_None, Py_None); };
  if (n != PyList_GET_SIZE(cached) || n != PyList_GET_SIZE(cached_locals) || snapshot.numel() != n * kColumns) {
    return rebuild();
  }
  int64_t* rows = snapshot.data_ptr<int64_t>();
  long verdict = kUnchanged;
  PyObject* grads = PyList_New(0);
  PyObject* written = PyList_New(0);
  if (grads == nullptr || written == nullptr) {
    Py_XDECREF(grads);
    Py_XDECREF(written);
    return nullptr;
  }
  const auto fail = [&](PyObject* result) {
    Py_DECREF(grads);
    Py_DECREF(written);
    return result;
  };
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* p = PyList_GET_ITEM(params, i);
    int64_t* row = rows + i * kColumns;
    PyObject *x, *grad;
    // The cache holds the parameters and their local tensors: their ids cannot be reused.
    if (p != PyList_GET_ITEM(cached, i) || !locals_of(p, row[kDistributed], &x, &grad)) return fail(rebuild());
    int64_t now[kColumns];
    const bool same = x == PyList_GET_ITEM(cached_locals, i) &&
                      describe(THPVariable_Unpack(x), tensor_or_undefined(grad), now) &&
                      now[kHasGrad] == row[kHasGrad] &&
                      (!now[kHasGrad] || (now[kParamAddress] == row[kParamAddress] &&
                                          now[kParamStrides] == row[kParamStrides] &&
                                          now[kGradDtype] == row[kGradDtype] && now[kGradStrides] == row[kGradStrides]));
    Py_DECREF(x);
    if (!same) {
      Py_DECREF(grad);
      return fail(rebuild());
    }
    if (row[kVersion] >= 0 && version(p) != row[kVersion]) {
      PyObject* position = PyLong_FromSsize_t(i);
      const int appended = position == nullptr ? -1 : PyList_Append(written, position);
      Py_XDECREF(position);
      if (appended != 0) {
        Py_DECREF(grad);
        return fail(nullptr);
      }
    }
    if (now[kHasGrad]) {
      // The kernels write x through the pointer table: tell autograd, as an in-place op would.
      const at::Tensor& stepped = THPVariable_Unpack(p);
      if (!stepped.is_inference()) stepped.unsafeGetTensorImpl()->bump_version();
      if (now[kGradAddress] != row[kGradAddress]) {
        row[kGradAddress] = now[kGradAddress];
        verdict = kNewGradientAddresses;
      }
      if (PyList_Append(grads, grad) != 0) {
        Py_DECREF(grad);
        return fail(nullptr);
      }
    }
    Py_DECREF(grad);
  }
  PyObject* result = Py_BuildValue("(lOO)", verdict, grads, written);
  Py_DECREF(grads);
  Py_DECREF(written);
  return result;
}

// record_versions(params: list, snapshot, positions: list[int]) -> None: the version counters of the
// parameters at `positions`, as a step leaves them, for the next check_step_cache to compare.
PyObject* record_versions(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 3 || !tensor_list(args[0]) || !THPVariable_Check(args[1]) || !PyList_Check(args[2])) {
    PyErr_SetString(PyExc_TypeError, "record_versions(params: list of tensors, snapshot: Tensor, positions: list)");
    return nullptr;
  }
  const Py_ssize_t n = PyList_GET_SIZE(args[0]);
  const at::Tensor& snapshot = THPVariable_Unpack(args[1]);
  if (snapshot.numel() != n * kColumns) {
    PyErr_SetString(PyExc_ValueError, "record_versions: the snapshot is not of these parameters");
    return nullptr;
  }
  int64_t* rows = snapshot.data_ptr<int64_t>();
  for (Py_ssize_t k = 0; k < PyList_GET_SIZE(args[2]); ++k) {
    const Py_ssize_t i = PyLong_AsSsize_t(PyList_GET_ITEM(args[2], k));
    if (i < 0 || i >= n) {
      if (!PyErr_Occurred()) PyErr_SetString(PyExc_IndexError, "record_versions: a position out of range");
      return nullptr;
    }
    rows[i * kColumns + kVersion] = version(PyList_GET_ITEM(args[0], i));
  }
  Py_RETURN_NONE;
}

PyMethodDef methods[] = {
    {"step_cache_snapshot", reinterpret_cast<PyCFunction>(step_cache_snapshot), METH_FASTCALL, nullptr},
    {"check_step_cache", reinterpret_cast<PyCFunction>(check_step_cache), METH_FASTCALL, nullptr},
    {"record_versions", reinterpret_cast<PyCFunction>(record_versions), METH_FASTCALL, nullptr},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace
}  // namespace largedet

// Importing the module also runs the op registrations of pmd_lamb_cpu.cpp (python_module.h).
LARGEDET_PYTHON_MODULE(largedet::methods)
