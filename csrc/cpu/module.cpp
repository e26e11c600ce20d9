// The CPU kernels' module: importing it runs pmd_lamb_cpu.cpp's op registrations (python_module.h).
#include "../python_module.h"

LARGEDET_PYTHON_MODULE(nullptr)
