/* The retry state machine, a malloc'd coordinator, the plugin interface and durable file
 * writes, through the header and the linked library. */
#include <dirent.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backup_coordinator.h"
#include "check.h"

typedef struct {
    int attempts;
    int fail_times;
    int32_t fail_code;
    uint32_t seen_retry[16];
    SRetryContext* ctx;
} Script;

/* Fails `fail_times` times with `fail_code`, then succeeds; notes current_retry per attempt. */
static int32_t scripted(void* user_data) {
    Script* s = (Script*)user_data;
    if (s->ctx != NULL && s->attempts < 16) s->seen_retry[s->attempts] = s->ctx->current_retry;
    s->attempts++;
    return s->attempts <= s->fail_times ? s->fail_code : BACKUP_SUCCESS;
}

static void test_codes(void) {
    CHECK(strcmp(backup_error_string(BACKUP_SUCCESS), "Success") == 0);
    CHECK(strcmp(backup_error_string(BACKUP_ERROR_DISK_FULL), "Disk full") == 0);
    CHECK(strcmp(backup_error_string(BACKUP_ERROR_IDEMPOTENCY_CONFLICT),
                 "Idempotency key reused with different payload") == 0);
    CHECK(strcmp(backup_error_string(-12345), "Unknown error") == 0);
    CHECK(strcmp(backup_error_string(BACKUP_ERROR_UNKNOWN), "Unknown error") == 0);
    CHECK_EQ_INT(BACKUP_ERROR_CANCELLED, -16);
    PASS("error codes and strings");
}

static void test_layout(void) {
    /* Field order of the original plugin: a harness that sets fields by name must agree
     * with the library on where they are. */
    CHECK_EQ_INT(sizeof(SRetryContext), 40);
    CHECK_EQ_INT(sizeof(SBackupCoordinatorConfig), 72);
    CHECK_EQ_INT(sizeof(SBackupCoordinator), 184);
    CHECK_EQ_INT(sizeof(SRetryPolicy), 48);
    PASS("struct layouts");
}

static void test_state_machine(void) {
    SRetryContext ctx;
    CHECK_EQ_INT(backup_retry_context_init(&ctx, 5, 0), BACKUP_SUCCESS);
    CHECK_EQ_INT(ctx.state, RETRY_STATE_IDLE);
    CHECK(ctx.error_message == NULL);

    Script s = {.fail_times = 3, .fail_code = BACKUP_ERROR_NETWORK, .ctx = &ctx};
    CHECK_EQ_INT(backup_execute_with_retry(&ctx, scripted, &s), BACKUP_SUCCESS);
    CHECK_EQ_INT(s.attempts, 4);
    CHECK_EQ_INT(ctx.state, RETRY_STATE_SUCCESS);
    CHECK_EQ_INT(ctx.current_retry, 3);
    CHECK(ctx.error_message == NULL);
    /* The operation saw the retry number of each attempt while it ran. */
    CHECK_EQ_INT(s.seen_retry[0], 0);
    CHECK_EQ_INT(s.seen_retry[3], 3);
    CHECK(ctx.last_retry_time > 1600000000000ULL);

    Script p = {.fail_times = 100, .fail_code = BACKUP_ERROR_INVALID_PARAM};
    CHECK_EQ_INT(backup_execute_with_retry(&ctx, scripted, &p), BACKUP_ERROR_INVALID_PARAM);
    CHECK_EQ_INT(p.attempts, 1);
    CHECK_EQ_INT(ctx.state, RETRY_STATE_FAILED);
    CHECK_EQ_INT(ctx.last_error, BACKUP_ERROR_INVALID_PARAM);
    CHECK(strcmp(ctx.error_message, "Invalid parameter") == 0);

    Script e = {.fail_times = 100, .fail_code = BACKUP_ERROR_CONNECTION_LOST};
    CHECK_EQ_INT(backup_execute_with_retry(&ctx, scripted, &e), BACKUP_ERROR_RETRY_EXHAUSTED);
    CHECK_EQ_INT(e.attempts, 6);
    CHECK_EQ_INT(ctx.current_retry, 5);
    CHECK_EQ_INT(ctx.last_error, BACKUP_ERROR_CONNECTION_LOST);
    CHECK(strcmp(ctx.error_message, "Connection lost") == 0);
    CHECK_EQ_INT(ctx.state, RETRY_STATE_FAILED);

    /* A code outside the table is permanent and returned as it is. */
    Script u = {.fail_times = 100, .fail_code = 4242};
    CHECK_EQ_INT(backup_execute_with_retry(&ctx, scripted, &u), 4242);
    CHECK_EQ_INT(u.attempts, 1);

    CHECK_EQ_INT(backup_execute_with_retry(NULL, scripted, &s), BACKUP_ERROR_INVALID_PARAM);
    CHECK_EQ_INT(backup_execute_with_retry(&ctx, NULL, &s), BACKUP_ERROR_INVALID_PARAM);
    CHECK_EQ_INT(backup_retry_context_init(NULL, 1, 1), BACKUP_ERROR_INVALID_PARAM);

    ctx.current_retry = 4;
    CHECK(backup_should_retry(&ctx, BACKUP_ERROR_TIMEOUT));
    CHECK(!backup_should_retry(&ctx, BACKUP_ERROR_DISK_FULL));
    ctx.current_retry = 5;
    CHECK(!backup_should_retry(&ctx, BACKUP_ERROR_NETWORK));
    CHECK(!backup_should_retry(NULL, BACKUP_ERROR_NETWORK));
    ctx.last_retry_time = 0;
    backup_wait_for_retry(&ctx); /* interval 0: returns at once */
    CHECK(ctx.last_retry_time > 0);
    backup_wait_for_retry(NULL);

    backup_retry_context_destroy(&ctx);
    CHECK(ctx.error_message == NULL);
    backup_retry_context_destroy(NULL);
    PASS("retry state machine");
}

static void test_policy(void) {
    SRetryContext ctx;
    backup_retry_context_init(&ctx, 0, 0);
    /* Waits 20, 40, 80 ms...; a 100 ms budget allows 20 + 40 and refuses the 80 ms wait. */
    SRetryPolicy policy = {.max_retry = 10, .initial_interval_ms = 20, .max_interval_ms = 0,
                           .multiplier = 2.0, .jitter = false, .timeout_ms = 100};
    Script s = {.fail_times = 100, .fail_code = BACKUP_ERROR_TIMEOUT};
    CHECK_EQ_INT(backup_execute_with_retry_policy(&ctx, &policy, scripted, &s), BACKUP_ERROR_TIMEOUT);
    CHECK_EQ_INT(s.attempts, 3);
    CHECK_EQ_INT(ctx.last_error, BACKUP_ERROR_TIMEOUT);
    CHECK(strcmp(ctx.error_message, "Operation timeout") == 0);

    policy.timeout_ms = 0;
    policy.max_retry = 3;
    policy.initial_interval_ms = 1;
    policy.jitter = true;
    Script ok = {.fail_times = 2, .fail_code = BACKUP_ERROR_NETWORK};
    CHECK_EQ_INT(backup_execute_with_retry_policy(&ctx, &policy, scripted, &ok), BACKUP_SUCCESS);
    CHECK_EQ_INT(ok.attempts, 3);

    policy.multiplier = 0.5;
    CHECK_EQ_INT(backup_execute_with_retry_policy(&ctx, &policy, scripted, &ok), BACKUP_ERROR_INVALID_PARAM);
    CHECK_EQ_INT(backup_execute_with_retry_policy(&ctx, NULL, scripted, &ok), BACKUP_ERROR_INVALID_PARAM);
    backup_retry_context_destroy(&ctx);
    PASS("extended retry policy");
}

static int count_files(const char* dir, const char* prefix) {
    DIR* d = opendir(dir);
    int n = 0;
    if (!d) return -1;
    struct dirent* e;
    while ((e = readdir(d)) != NULL)
        if (strncmp(e->d_name, prefix, strlen(prefix)) == 0) n++;
    closedir(d);
    return n;
}

static char* read_all(const char* path) {
    FILE* f = fopen(path, "rb");
    if (!f) return NULL;
    static char buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    return buf;
}

static void test_malloced_coordinator(const char* workdir) {
    char logdir[512];
    snprintf(logdir, sizeof logdir, "%s/errors", workdir);
    SBackupCoordinatorConfig config = {
        .max_blocks_per_batch = 1000, .batch_timeout_ms = 5000, .enable_compression = true,
        .enable_encryption = true, .encryption_key = "s3cret-key", .error_retry_max = 3,
        .error_retry_interval = 0, .error_store_path = logdir, .enable_error_logging = true,
        .error_buffer_size = 1000, .backup_path = NULL, .backup_max_size = 1024 * 1024 * 1024,
        .compression_level = 1};
    SBackupCoordinator* c = (SBackupCoordinator*)malloc(sizeof(SBackupCoordinator));
    CHECK(c != NULL);
    c->config = config;
    c->bitmap_engine = NULL;
    c->event_interceptor = NULL;
    c->active_cursor = NULL;
    c->last_error_message = NULL;
    c->error_count = 0;
    c->retry_count = 0;
    c->total_backup_blocks = 0;
    c->total_backup_size = 0;
    c->backup_duration_ms = 0;
    backup_retry_context_init(&c->retry_context, config.error_retry_max, config.error_retry_interval);

    CHECK(strcmp(backup_get_last_error(c), "Success") == 0);
    backup_record_error(c, BACKUP_ERROR_NETWORK, "Network connection failed");
    CHECK_STR_CONTAINS(backup_get_last_error(c), "Network connection failed");
    CHECK_STR_CONTAINS(c->last_error_message, "Network connection failed");
    backup_record_error(c, BACKUP_ERROR_DISK_FULL, NULL);
    CHECK(strcmp(backup_get_last_error(c), "Disk full") == 0);
    backup_record_error(c, BACKUP_ERROR_DATA_CORRUPTION, "key s3cret-key rejected");
    CHECK(strstr(backup_get_last_error(c), "s3cret-key") == NULL);

    uint64_t errors = 99, retries = 99;
    backup_get_error_stats(c, &errors, &retries);
    CHECK_EQ_INT(errors, 3);
    CHECK_EQ_INT(retries, 0);
    CHECK_EQ_INT(c->error_count, 3);

    SBackupErrorRecord history[8];
    uint32_t held = 0;
    CHECK_EQ_INT(backup_get_error_history(c, history, 8, &held), BACKUP_SUCCESS);
    CHECK_EQ_INT(held, 3);
    CHECK_EQ_INT(history[0].code, BACKUP_ERROR_DATA_CORRUPTION);
    CHECK(strcmp(history[1].message, "Disk full") == 0);

    /* Each record is one line of the error log, in the contract's format, secret redacted. */
    CHECK_EQ_INT(count_files(logdir, "backup_error_"), 1);
    DIR* d = opendir(logdir);
    struct dirent* e;
    char logfile[1024] = {0};
    while ((e = readdir(d)) != NULL)
        if (strncmp(e->d_name, "backup_error_", 13) == 0) snprintf(logfile, sizeof logfile, "%s/%s", logdir, e->d_name);
    closedir(d);
    char* log = read_all(logfile);
    CHECK_STR_CONTAINS(log, "] Error -6: Network connection failed\n");
    CHECK_STR_CONTAINS(log, "] Error -10: Disk full\n");
    CHECK(strstr(log, "s3cret-key") == NULL);
    struct stat st;
    CHECK(stat(logfile, &st) == 0);
    CHECK_EQ_INT(st.st_mode & 0777, 0640);

    backup_clear_error(c);
    CHECK(strcmp(backup_get_last_error(c), "Success") == 0);
    CHECK(c->last_error_message == NULL);

    /* Durable write through the coordinator's retry context. */
    char path[512];
    snprintf(path, sizeof path, "%s/block_0001.dat", workdir);
    const char* data = "Hello, World!";
    CHECK_EQ_INT(backup_write_file_with_retry(c, path, data, strlen(data)), BACKUP_SUCCESS);
    CHECK(strcmp(read_all(path), data) == 0);
    CHECK_EQ_INT(count_files(workdir, ".block_0001.dat"), 0);

    /* A missing directory: FILE_IO, retried max_retry times, then exhausted and recorded. */
    snprintf(path, sizeof path, "%s/missing/dir/f", workdir);
    CHECK_EQ_INT(backup_write_file_with_retry(c, path, data, strlen(data)), BACKUP_ERROR_RETRY_EXHAUSTED);
    CHECK_EQ_INT(c->retry_context.last_error, BACKUP_ERROR_FILE_IO);
    CHECK_EQ_INT(c->retry_context.current_retry, 3);
    backup_get_error_stats(c, &errors, &retries);
    CHECK_EQ_INT(errors, 4);
    CHECK_EQ_INT(retries, 3);
    CHECK_STR_CONTAINS(backup_get_last_error(c), "missing/dir");

    CHECK_EQ_INT(backup_write_file_with_retry(c, NULL, data, 1), BACKUP_ERROR_INVALID_PARAM);
    CHECK_STR_CONTAINS(backup_get_last_error(c), "file_path");
    CHECK_EQ_INT(backup_write_file_with_retry(c, path, NULL, 5), BACKUP_ERROR_INVALID_PARAM);
    CHECK_EQ_INT(backup_write_file_with_retry(NULL, path, data, 1), BACKUP_ERROR_INVALID_PARAM);

    /* The caller's config strings (literals here) stay the caller's: destroy frees the struct only. */
    backup_coordinator_destroy(c);
    backup_coordinator_destroy(NULL);
    CHECK(strcmp(config.encryption_key, "s3cret-key") == 0);
    PASS("malloc'd coordinator");
}

static void test_library_coordinator(const char* workdir) {
    char key[] = "another-key";
    char store[512];
    snprintf(store, sizeof store, "%s/lib-errors", workdir);
    SBackupCoordinatorConfig config = {.error_retry_max = 2, .error_retry_interval = 0,
                                       .error_store_path = store, .enable_error_logging = true,
                                       .error_buffer_size = 10, .encryption_key = key};
    SBackupCoordinator* c = backup_coordinator_init(&config, NULL, NULL);
    CHECK(c != NULL);
    CHECK(c->config.encryption_key != key); /* copied */
    CHECK(strcmp(c->config.error_store_path, store) == 0);
    CHECK_EQ_INT(c->retry_context.max_retry, 2);
    backup_record_error(c, BACKUP_ERROR_TIMEOUT, NULL);
    CHECK(strcmp(backup_get_last_error(c), "Operation timeout") == 0);
    backup_coordinator_destroy(c);
    CHECK(backup_coordinator_init(NULL, NULL, NULL) == NULL);
    PASS("library-allocated coordinator");
}

static int32_t always_network(void* user_data) {
    (*(int*)user_data)++;
    return BACKUP_ERROR_NETWORK;
}

static void test_plugin_interface(const char* workdir) {
    CHECK(strcmp(backup_plugin_get_last_error(), "Plugin not initialized") == 0);
    int calls = 0;
    CHECK_EQ_INT(backup_plugin_execute_with_retry(always_network, &calls), BACKUP_ERROR_NOT_INITIALIZED);
    CHECK_EQ_INT(calls, 0);
    CHECK_EQ_INT(backup_plugin_execute_with_retry(NULL, &calls), BACKUP_ERROR_INVALID_PARAM);

    /* Invalid config: the last error names the key and the bad value. */
    const char* bad = "[plugins.incremental_bitmap]\nerror_retry_max = -3\n";
    CHECK_EQ_INT(backup_plugin_init(bad, (uint32_t)strlen(bad)), BACKUP_ERROR_INVALID_PARAM);
    CHECK_STR_CONTAINS(backup_plugin_get_last_error(), "error_retry_max");
    CHECK_STR_CONTAINS(backup_plugin_get_last_error(), "-3");
    const char* typo = "error_retyr_max = 3";
    CHECK_EQ_INT(backup_plugin_init(typo, (uint32_t)strlen(typo)), BACKUP_ERROR_INVALID_PARAM);
    CHECK_STR_CONTAINS(backup_plugin_get_last_error(), "error_retyr_max");

    /* The length is what counts, not a NUL: the tail after config_len is not read. */
    char config[1024];
    int len = snprintf(config, sizeof config,
                       "[plugins.incremental_bitmap]\nerror_retry_max = 2\nerror_retry_interval = \"0s\"\n"
                       "error_store_path = \"%s/plugin-errors\"\nGARBAGE THAT IS NOT TOML",
                       workdir);
    len -= (int)strlen("GARBAGE THAT IS NOT TOML");
    CHECK_EQ_INT(backup_plugin_init(config, (uint32_t)len), BACKUP_SUCCESS);
    CHECK(strcmp(backup_plugin_get_last_error(), "Success") == 0);
    CHECK_EQ_INT(backup_plugin_init(config, (uint32_t)len), BACKUP_ERROR_INIT_FAILED);

    uint64_t errors = 9, retries = 9;
    backup_plugin_get_error_stats(&errors, &retries);
    CHECK_EQ_INT(errors, 0);
    CHECK_EQ_INT(retries, 0);

    CHECK_EQ_INT(backup_plugin_execute_with_retry(always_network, &calls), BACKUP_ERROR_RETRY_EXHAUSTED);
    CHECK_EQ_INT(calls, 3);
    backup_plugin_get_error_stats(&errors, &retries);
    CHECK_EQ_INT(errors, 1); /* one per call, not per attempt */
    CHECK_EQ_INT(retries, 2);
    CHECK_STR_CONTAINS(backup_plugin_get_last_error(), "exhausted");

    backup_plugin_record_error(BACKUP_ERROR_CONNECTION_LOST, NULL);
    CHECK(strcmp(backup_plugin_get_last_error(), "Connection lost") == 0);
    backup_plugin_get_error_stats(&errors, NULL);
    CHECK_EQ_INT(errors, 2);
    backup_plugin_clear_error();
    CHECK(strcmp(backup_plugin_get_last_error(), "Success") == 0);

    char path[512];
    snprintf(path, sizeof path, "%s/plugin_file.dat", workdir);
    CHECK_EQ_INT(backup_plugin_write_file_with_retry(path, "abc", 3), BACKUP_SUCCESS);
    CHECK(strcmp(read_all(path), "abc") == 0);
    CHECK_EQ_INT(backup_plugin_write_file_with_retry(NULL, "abc", 3), BACKUP_ERROR_INVALID_PARAM);
    CHECK_STR_CONTAINS(backup_plugin_get_last_error(), "path");
    CHECK(backup_plugin_get_error_log_path() != NULL);

    backup_plugin_cleanup();
    CHECK(strcmp(backup_plugin_get_last_error(), "Plugin not initialized") == 0);
    backup_plugin_get_error_stats(&errors, &retries);
    CHECK_EQ_INT(errors, 0);
    /* init again after cleanup; empty config means defaults. */
    CHECK_EQ_INT(backup_plugin_init("", 0), BACKUP_SUCCESS);
    CHECK_EQ_INT(backup_plugin_init(NULL, 0), BACKUP_ERROR_INIT_FAILED);
    backup_plugin_cleanup();
    CHECK_EQ_INT(backup_plugin_init(NULL, 0), BACKUP_SUCCESS);
    backup_plugin_cleanup();
    CHECK(strlen(backup_plugin_name()) > 0);
    CHECK(strlen(backup_plugin_version()) > 0);
    PASS("plugin interface");
}

int main(int argc, char** argv) {
    char workdir[] = "/tmp/backup_retry_test_XXXXXX";
    CHECK(mkdtemp(workdir) != NULL);
    (void)argc;
    (void)argv;
    test_codes();
    test_layout();
    test_state_machine();
    test_policy();
    test_malloced_coordinator(workdir);
    test_library_coordinator(workdir);
    test_plugin_interface(workdir);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", workdir);
    if (system(cmd) != 0) return 1;
    printf("test_retry_mechanism: all %d checks passed\n", g_checks);
    return 0;
}
