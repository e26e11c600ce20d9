// The init function of an extension module whose import only runs the file's op registrations
// (and exposes `methods`, a null-terminated PyMethodDef array or nullptr). Its name is
// TORCH_EXTENSION_NAME, which torch's build passes: _C and _C_cpu_<isa> ahead of time, other names
// when built on first use (largedet_kernels/_extensions.py), one CPU module per ISA.
#pragma once

#include <Python.h>

#ifndef TORCH_EXTENSION_NAME
#error "TORCH_EXTENSION_NAME names the module; build through torch.utils.cpp_extension"
#endif

#define LARGEDET_CONCAT_(a, b) a##b
#define LARGEDET_CONCAT(a, b) LARGEDET_CONCAT_(a, b)
#define LARGEDET_STRING_(a) #a
#define LARGEDET_STRING(a) LARGEDET_STRING_(a)

#define LARGEDET_PYTHON_MODULE(methods)                                                                      \
  extern "C" PyObject* LARGEDET_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {                              \
    static PyModuleDef module = {PyModuleDef_HEAD_INIT, LARGEDET_STRING(TORCH_EXTENSION_NAME), nullptr, -1, \
                                 methods};                                                                 \
    return PyModule_Create(&module);                                                                       \
  }
