// CCUDA is declarations only, plus one helper: the Swift layer resolves every CUDA function with
// dlsym at run time.
#define _GNU_SOURCE
#include <dlfcn.h>
#include "CCUDA.h"

const char *ccuda_path_of_symbol(const void *symbol) {
    Dl_info info;
    if (symbol == NULL || dladdr(symbol, &info) == 0) return NULL;
    return info.dli_fname;
}
