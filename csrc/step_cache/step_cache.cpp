// The per-step check of the optimizer's step cache (NOTE [step cache] in largedet_kernels/step_cache.py),
// over the flat parameter list in one call: ~35 ns a tensor, where the same checks as map() passes in Python
// cost ~0.7 us. An extension of its own, so that every fused backend has it whichever kernels are built.
// pybind11 functions over Python objects, no torch.ops call: one would convert the lists to tensors first,
// which costs more than the checks.
#include <pybind11/pybind11.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <string>

#ifndef TORCH_EXTENSION_NAME
#error "TORCH_EXTENSION_NAME names the module; build through torch.utils.cpp_extension"
#endif

namespace py = pybind11;

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
int64_t version(py::handle p) {
  const at::Tensor& t = THPVariable_Unpack(p.ptr());
  return t.is_inference() ? 0 : static_cast<int64_t>(t.unsafeGetTensorImpl()->version_counter().current_version());
}

// Whether t is a tensor, by its type alone: THPVariable_Check asks __instancecheck__ for a subclass (a DTensor),
// which costs ~40 ns and could say yes for an object without the layout that THPVariable_Unpack reads.
bool is_tensor(py::handle t) {
  return THPVariable_CheckExact(t.ptr()) ||
         PyObject_TypeCheck(t.ptr(), reinterpret_cast<PyTypeObject*>(THPVariableClass));
}

PyObject* local_tensor_name() {
  static PyObject* name = PyUnicode_InternFromString("_local_tensor");
  return name;
}

// A DTensor's local tensor (DTensor._local_tensor, what to_local() returns under no_grad); a null object, no error
// set, for anything but a tensor.
py::object local_tensor(py::handle t) {
  py::object local = py::reinterpret_steal<py::object>(PyObject_GetAttr(t.ptr(), local_tensor_name()));
  if (!local) PyErr_Clear();
  if (!local || !is_tensor(local)) return {};
  return local;
}

// A parameter's local tensor x (the parameter itself, or a DTensor's local tensor, which `local` holds) and its
// local gradient (None for none).
struct Locals {
  py::handle x;
  py::object local, grad;
};

// The locals of parameter p, a tensor; false when either is not a tensor.
bool locals_of(py::handle p, bool distributed, Locals* out) {
  if (distributed) {
    out->local = local_tensor(p);
    if (!out->local) return false;
  }
  out->x = distributed ? out->local : p;
  const at::Tensor& g = THPVariable_Unpack(p.ptr()).grad();
  if (!g.defined()) {
    out->grad = py::none();
    return true;
  }
  out->grad = py::reinterpret_steal<py::object>(THPVariable_Wrap(g));
  if (!out->grad) {
    PyErr_Clear();
    return false;
  }
  if (distributed) out->grad = local_tensor(out->grad);
  return static_cast<bool>(out->grad);
}

const at::Tensor& tensor_or_undefined(py::handle t) {
  static const at::Tensor undefined;
  return t.is_none() ? undefined : THPVariable_Unpack(t.ptr());
}

// The parameters' rows of the snapshot; TypeError unless every parameter is a tensor, ValueError unless the
// snapshot has a row for each.
int64_t* rows_of(const py::list& params, const at::Tensor& snapshot, const char* function) {
  for (const py::handle p : params) {
    if (!is_tensor(p)) throw py::type_error(std::string(function) + ": the parameters must be tensors");
  }
  if (!snapshot.is_cpu() || snapshot.scalar_type() != at::kLong || !snapshot.is_contiguous() ||
      snapshot.numel() != static_cast<int64_t>(params.size()) * kColumns) {
    throw py::value_error(std::string(function) + ": the snapshot must be a contiguous CPU int64 [len(params), 8]");
  }
  return snapshot.data_ptr<int64_t>();
}

// step_cache_snapshot(params: list[Tensor], snapshot: int64 CPU tensor [len(params), kColumns]) -> bool:
// fills the snapshot; False when a tensor cannot be watched here (the Python check then runs).
bool step_cache_snapshot(const py::list& params, const at::Tensor& snapshot) {
  int64_t* rows = rows_of(params, snapshot, "step_cache_snapshot");
  const Py_ssize_t n = static_cast<Py_ssize_t>(params.size());
  Locals locals;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const py::handle p = PyList_GET_ITEM(params.ptr(), i);
    const bool distributed = PyObject_HasAttr(p.ptr(), local_tensor_name());
    if (!locals_of(p, distributed, &locals)) return false;
    int64_t* row = rows + i * kColumns;
    row[kDistributed] = distributed;
    row[kVersion] = -1;
    if (!describe(THPVariable_Unpack(locals.x.ptr()), tensor_or_undefined(locals.grad), row)) return false;
  }
  return true;
}

// check_step_cache(params: list, cached: list, locals: list, snapshot) -> (int, list | None, list | None):
// kUnchanged or kNewGradientAddresses (the snapshot then holds the new ones) with the local gradients of the
// parameters that have one, in order, whose version counters it advances for the step, and the positions of
// the parameters written since the last step by anything else (their version counters moved); or kRebuild,
// None, None (a parameter, its local tensor, storage or layout, or a gradient's presence, dtype or layout
// changed). `cached` and `locals` are the parameters (the list the snapshot was taken of, whose tensors it checked)
// and their local tensors when the snapshot was taken.
py::tuple check_step_cache(const py::list& params, const py::list& cached, const py::list& cached_locals,
                           const at::Tensor& snapshot) {
  const Py_ssize_t n = static_cast<Py_ssize_t>(params.size());
  const auto rebuild = [] { return py::make_tuple(static_cast<long>(kRebuild), py::none(), py::none()); };
  if (n != static_cast<Py_ssize_t>(cached.size()) || n != static_cast<Py_ssize_t>(cached_locals.size()) ||
      snapshot.numel() != n * kColumns) {
    return rebuild();
  }
  int64_t* rows = snapshot.data_ptr<int64_t>();
  long verdict = kUnchanged;
  py::list grads, written;
  Locals locals;
  for (Py_ssize_t i = 0; i < n; ++i) {
    const py::handle p = PyList_GET_ITEM(params.ptr(), i);
    int64_t* row = rows + i * kColumns;
    // The cache holds the parameters and their local tensors: their ids cannot be reused, and p is a tensor.
    if (p.ptr() != PyList_GET_ITEM(cached.ptr(), i) || !locals_of(p, row[kDistributed], &locals)) return rebuild();
    int64_t now[kColumns];
    const bool same = locals.x.ptr() == PyList_GET_ITEM(cached_locals.ptr(), i) &&
                      describe(THPVariable_Unpack(locals.x.ptr()), tensor_or_undefined(locals.grad), now) &&
                      now[kHasGrad] == row[kHasGrad] &&
                      (!now[kHasGrad] || (now[kParamAddress] == row[kParamAddress] &&
                                          now[kParamStrides] == row[kParamStrides] &&
                                          now[kGradDtype] == row[kGradDtype] &&
                                          now[kGradStrides] == row[kGradStrides]));
    if (!same) return rebuild();
    if (row[kVersion] >= 0 && version(p) != row[kVersion]) written.append(i);
    if (now[kHasGrad]) {
      // The kernels write x through the pointer table: tell autograd, as an in-place op would.
      const at::Tensor& stepped = THPVariable_Unpack(p.ptr());
      if (!stepped.is_inference()) stepped.unsafeGetTensorImpl()->bump_version();
      if (now[kGradAddress] != row[kGradAddress]) {
        row[kGradAddress] = now[kGradAddress];
        verdict = kNewGradientAddresses;
      }
      grads.append(locals.grad);
    }
  }
  return py::make_tuple(verdict, std::move(grads), std::move(written));
}

// record_versions(params: list, snapshot, positions: list[int]) -> None: the version counters of the
// parameters at `positions`, as a step leaves them, for the next check_step_cache to compare.
void record_versions(const py::list& params, const at::Tensor& snapshot, const py::list& positions) {
  int64_t* rows = rows_of(params, snapshot, "record_versions");
  const Py_ssize_t n = static_cast<Py_ssize_t>(params.size());
  for (const py::handle position : positions) {
    const Py_ssize_t i = PyLong_AsSsize_t(position.ptr());
    if (i == -1 && PyErr_Occurred()) throw py::error_already_set();
    if (i < 0 || i >= n) throw py::index_error("record_versions: a position out of range");
    rows[i * kColumns + kVersion] = version(PyList_GET_ITEM(params.ptr(), i));
  }
}

}  // namespace
}  // namespace largedet

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("step_cache_snapshot", &largedet::step_cache_snapshot, py::arg("params"), py::arg("snapshot"));
  m.def("check_step_cache", &largedet::check_step_cache, py::arg("params"), py::arg("cached"), py::arg("locals"),
        py::arg("snapshot"));
  m.def("record_versions", &largedet::record_versions, py::arg("params"), py::arg("snapshot"), py::arg("positions"));
}
