/* Loads the plugin the way taosX does: the shared library from a plugin directory with
 * dlopen, every entry point with dlsym, and the plugin's own TOML section of the taosX
 * config handed over as a length-delimited string. Shared by the demo host and the dlopen
 * harness. Types come from the generated header; functions only through this table. */
#ifndef BACKUP_PLUGIN_LOADER_H
#define BACKUP_PLUGIN_LOADER_H

#include <dirent.h>
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backup_coordinator.h"

#define PLUGIN_SECTION "[plugins.incremental_bitmap]"
#define PLUGIN_LIBRARY "libbackup_coordinator.so"

typedef struct {
    void* handle;
    const char* (*name)(void);
    const char* (*version)(void);
    int32_t (*init)(const char*, uint32_t);
    void (*cleanup)(void);
    const char* (*get_last_error)(void);
    void (*get_error_stats)(uint64_t*, uint64_t*);
    void (*clear_error)(void);
    void (*record_error)(int32_t, const char*);
    int32_t (*write_file_with_retry)(const char*, const void*, size_t);
    int32_t (*execute_with_retry)(int32_t (*)(void*), void*);
    int32_t (*get_error_history)(SBackupErrorRecord*, uint32_t, uint32_t*);
    const char* (*get_error_log_path)(void);
    const char* (*error_string)(int32_t);
    int32_t (*retry_context_init)(SRetryContext*, uint32_t, uint32_t);
    void (*retry_context_destroy)(SRetryContext*);
    int32_t (*execute_with_retry_ctx)(SRetryContext*, int32_t (*)(void*), void*);
    int32_t (*execute_with_retry_policy)(SRetryContext*, const SRetryPolicy*, int32_t (*)(void*), void*);
    bool (*should_retry)(SRetryContext*, int32_t);
    void (*wait_for_retry)(SRetryContext*);
    SBackupCoordinator* (*coordinator_init)(const SBackupCoordinatorConfig*, SBitmapEngine*, SEventInterceptor*);
    void (*coordinator_destroy)(SBackupCoordinator*);
    void (*record_error_c)(SBackupCoordinator*, int32_t, const char*);
    const char* (*get_last_error_c)(SBackupCoordinator*);
    void (*clear_error_c)(SBackupCoordinator*);
    void (*get_error_stats_c)(SBackupCoordinator*, uint64_t*, uint64_t*);
    int32_t (*write_file_with_retry_c)(SBackupCoordinator*, const char*, const void*, size_t);
    int32_t (*execute_idempotent)(const char*, const void*, size_t, backup_idempotent_op_fn, void*, bool*);
    int32_t (*idempotency_forget)(const char*);
    int32_t (*get_metrics)(char*, size_t, size_t*);
    int32_t (*execute_idempotent_fenced)(const char*, const void*, size_t, backup_fenced_op_fn, void*, bool*);
    int32_t (*idempotency_check_claim)(const char*, uint64_t);
    int32_t (*write_file_fenced)(const char*, const void*, size_t, uint64_t);
} BackupPlugin;

/* Resolves one symbol; a missing entry point is an error that names it. */
#define LOAD_SYM(p, field, symbol)                                                 \
    do {                                                                           \
        *(void**)(&(p)->field) = dlsym((p)->handle, symbol);                       \
        if ((p)->field == NULL) {                                                  \
            fprintf(stderr, "plugin loader: entry point %s missing: %s\n", symbol, \
                    dlerror());                                                    \
            return -1;                                                             \
        }                                                                          \
    } while (0)

/* dlopen `<plugin_dir>/libbackup_coordinator.so` and resolve every entry point. */
static inline int backup_plugin_load(BackupPlugin* p, const char* plugin_dir) {
    char path[4096];
    memset(p, 0, sizeof *p);
    snprintf(path, sizeof path, "%s/%s", plugin_dir, PLUGIN_LIBRARY);
    p->handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (p->handle == NULL) {
        fprintf(stderr, "plugin loader: dlopen(%s): %s\n", path, dlerror());
        return -1;
    }
    LOAD_SYM(p, name, "backup_plugin_name");
    LOAD_SYM(p, version, "backup_plugin_version");
    LOAD_SYM(p, init, "backup_plugin_init");
    LOAD_SYM(p, cleanup, "backup_plugin_cleanup");
    LOAD_SYM(p, get_last_error, "backup_plugin_get_last_error");
    LOAD_SYM(p, get_error_stats, "backup_plugin_get_error_stats");
    LOAD_SYM(p, clear_error, "backup_plugin_clear_error");
    LOAD_SYM(p, record_error, "backup_plugin_record_error");
    LOAD_SYM(p, write_file_with_retry, "backup_plugin_write_file_with_retry");
    LOAD_SYM(p, execute_with_retry, "backup_plugin_execute_with_retry");
    LOAD_SYM(p, get_error_history, "backup_plugin_get_error_history");
    LOAD_SYM(p, get_error_log_path, "backup_plugin_get_error_log_path");
    LOAD_SYM(p, error_string, "backup_error_string");
    LOAD_SYM(p, retry_context_init, "backup_retry_context_init");
    LOAD_SYM(p, retry_context_destroy, "backup_retry_context_destroy");
    LOAD_SYM(p, execute_with_retry_ctx, "backup_execute_with_retry");
    LOAD_SYM(p, execute_with_retry_policy, "backup_execute_with_retry_policy");
    LOAD_SYM(p, should_retry, "backup_should_retry");
    LOAD_SYM(p, wait_for_retry, "backup_wait_for_retry");
    LOAD_SYM(p, coordinator_init, "backup_coordinator_init");
    LOAD_SYM(p, coordinator_destroy, "backup_coordinator_destroy");
    LOAD_SYM(p, record_error_c, "backup_record_error");
    LOAD_SYM(p, get_last_error_c, "backup_get_last_error");
    LOAD_SYM(p, clear_error_c, "backup_clear_error");
    LOAD_SYM(p, get_error_stats_c, "backup_get_error_stats");
    LOAD_SYM(p, write_file_with_retry_c, "backup_write_file_with_retry");
    LOAD_SYM(p, execute_idempotent, "backup_execute_idempotent");
    LOAD_SYM(p, idempotency_forget, "backup_idempotency_forget");
    LOAD_SYM(p, get_metrics, "backup_plugin_get_metrics");
    LOAD_SYM(p, execute_idempotent_fenced, "backup_execute_idempotent_fenced");
    LOAD_SYM(p, idempotency_check_claim, "backup_idempotency_check_claim");
    LOAD_SYM(p, write_file_fenced, "backup_plugin_write_file_fenced");
    return 0;
}

static inline void backup_plugin_unload(BackupPlugin* p) {
    if (p->handle) dlclose(p->handle);
    p->handle = NULL;
}

/* Reads a whole file; the caller frees it. */
static inline char* loader_read_file(const char* path, size_t* len_out) {
    FILE* f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long len = ftell(f);
    fseek(f, 0, SEEK_SET);
    char* text = (char*)malloc((size_t)len + 1);
    if (text && fread(text, 1, (size_t)len, f) != (size_t)len) {
        free(text);
        text = NULL;
    }
    fclose(f);
    if (text) {
        text[len] = 0;
        *len_out = (size_t)len;
    }
    return text;
}

/* The plugin's section of a taosX config: from its header line to the next table header
 * that is not one of its sub-tables. Points into `toml` (not NUL-terminated at the end);
 * NULL when the section is absent. */
static inline const char* backup_plugin_section(const char* toml, size_t* len_out) {
    const char* start = strstr(toml, PLUGIN_SECTION);
    while (start && start != toml && start[-1] != '\n') start = strstr(start + 1, PLUGIN_SECTION);
    if (!start) return NULL;
    const char* line = strchr(start, '\n');
    while (line) {
        const char* next = line + 1;
        while (*next == ' ' || *next == '\t') next++;
        if (*next == '[' && strncmp(next, "[plugins.incremental_bitmap.", 28) != 0) break;
        line = strchr(next, '\n');
    }
    *len_out = line ? (size_t)(line + 1 - start) : strlen(start);
    return start;
}

#endif
