// PAGEDLM_MULTIVERSION compiles a CPU hot loop twice, for AVX2+FMA (x86-64-v3) and for the
// baseline, and picks one at load time, so one wheel is fast on new CPUs and runs on old ones.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PAGEDLM_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define PAGEDLM_MULTIVERSION
#endif
