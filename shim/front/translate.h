/*
 * translate.h — the simulator's compiler front: MSL source in, kernel
 * library (a shared object exporting camel_sim_library / camel_sim_bind,
 * see sim_abi.h) out. Implemented in translate.cpp; called by the runtime's
 * camel_library_new.
 */
#ifndef CAMEL_SIM_TRANSLATE_H
#define CAMEL_SIM_TRANSLATE_H

#ifdef __cplusplus
extern "C" {
#endif

/* Compile `source` (named `path` in messages; may be NULL) into a shared
 * object, reusing the on-disk cache keyed by the hash of source, flags
 * (CAMEL_SIM_SANITIZE) and compiler version. On success returns 0 and a
 * malloc'd path in *so_path. On failure returns non-zero and a malloc'd
 * message in *log: the compiler log with lines of the .metal file, or the
 * portability guard's "[sim] line 12: 'double' is not supported by Metal". */
int camel_sim_compile(const char *source, const char *path, char **so_path, char **log);

#ifdef __cplusplus
}
#endif
#endif
