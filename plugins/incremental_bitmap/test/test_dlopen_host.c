/* A host that knows the plugin only by path, as taosX does: copy the built library into a
 * plugin directory, dlopen it, dlsym every entry point, pass the plugin section of a taosX
 * config (not NUL-terminated), and drive each call. */
#include <unistd.h>

#include "../demo/plugin_loader.h"
#include "check.h"

static int32_t fail_twice(void* user_data) {
    int* calls = (int*)user_data;
    return ++(*calls) <= 2 ? BACKUP_ERROR_CONNECTION_LOST : BACKUP_SUCCESS;
}

int main(void) {
    const char* built = getenv("BACKUP_PLUGIN_LIB");
    CHECK(built != NULL);
    char dir[] = "/tmp/backup_dlopen_XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    char cmd[8192];
    snprintf(cmd, sizeof cmd, "mkdir -p '%s/plugins' && cp '%s' '%s/plugins/'", dir, built, dir);
    CHECK(system(cmd) == 0);

    BackupPlugin p;
    char plugin_dir[512];
    snprintf(plugin_dir, sizeof plugin_dir, "%s/plugins", dir);
    CHECK(backup_plugin_load(&p, plugin_dir) == 0);
    CHECK(strcmp(p.name(), "incremental_bitmap_backup") == 0);

    /* A taosX config with other sections around ours. */
    char toml[2048];
    snprintf(toml, sizeof toml,
             "[server]\nport = 6060\n\n"
             "[plugins.incremental_bitmap]\n"
             "error_retry_max = 4\nerror_retry_interval = \"1ms\"\n"
             "error_store_path = \"%s/errors\"\n\n"
             "[plugins.other]\nkey = \"not ours\"\n",
             dir);
    size_t len = 0;
    const char* section = backup_plugin_section(toml, &len);
    CHECK(section != NULL);
    CHECK(section[len] == '[');               /* not NUL-terminated where it ends */
    CHECK_EQ_INT(p.init(section, (uint32_t)len), BACKUP_SUCCESS);

    int calls = 0;
    CHECK_EQ_INT(p.execute_with_retry(fail_twice, &calls), BACKUP_SUCCESS);
    CHECK_EQ_INT(calls, 3);
    uint64_t errors = 0, retries = 0;
    p.get_error_stats(&errors, &retries);
    CHECK_EQ_INT(errors, 0);
    CHECK_EQ_INT(retries, 2);

    char path[600];
    snprintf(path, sizeof path, "%s/out.dat", dir);
    CHECK_EQ_INT(p.write_file_with_retry(path, "payload", 7), BACKUP_SUCCESS);
    p.record_error(BACKUP_ERROR_NETWORK, "taosd unreachable");
    CHECK(strcmp(p.get_last_error(), "taosd unreachable") == 0);
    CHECK_STR_CONTAINS(p.get_error_log_path(), "/errors/backup_error_");
    SBackupErrorRecord rec[4];
    uint32_t held = 0;
    CHECK_EQ_INT(p.get_error_history(rec, 4, &held), BACKUP_SUCCESS);
    CHECK_EQ_INT(held, 1);
    CHECK(strcmp(p.error_string(BACKUP_ERROR_TIMEOUT), "Operation timeout") == 0);

    SRetryContext ctx;
    CHECK_EQ_INT(p.retry_context_init(&ctx, 3, 0), BACKUP_SUCCESS);
    calls = 0;
    CHECK_EQ_INT(p.execute_with_retry_ctx(&ctx, fail_twice, &calls), BACKUP_SUCCESS);
    CHECK(!p.should_retry(&ctx, BACKUP_ERROR_PERMISSION_DENIED));
    p.wait_for_retry(&ctx);
    p.retry_context_destroy(&ctx);

    SBackupCoordinatorConfig config = {.error_retry_max = 1, .error_retry_interval = 0};
    SBackupCoordinator* c = p.coordinator_init(&config, NULL, NULL);
    CHECK(c != NULL);
    p.record_error_c(c, BACKUP_ERROR_FILE_IO, NULL);
    CHECK(strcmp(p.get_last_error_c(c), "File I/O error") == 0);
    CHECK_EQ_INT(p.write_file_with_retry_c(c, path, "x", 1), BACKUP_SUCCESS);
    p.get_error_stats_c(c, &errors, &retries);
    CHECK_EQ_INT(errors, 1);
    p.clear_error_c(c);
    p.coordinator_destroy(c);

    p.clear_error();
    p.cleanup();
    CHECK(strcmp(p.get_last_error(), "Plugin not initialized") == 0);
    backup_plugin_unload(&p);
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0);
    printf("test_dlopen_host: all %d checks passed\n", g_checks);
    return 0;
}
