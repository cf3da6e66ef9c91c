/* C `bool` fields hold whatever byte C code left there: a malloc'd struct filled field by
 * field, or with memset, may carry 2 or 0xff where a bool is. The library reads each such
 * field as a byte (any non-zero value is true), never as a Rust bool (undefined behaviour
 * for bytes other than 0 and 1). Runs plain and under ASan+UBSan. */
#include <dirent.h>
#include <stdint.h>
#include <unistd.h>

#include "backup_coordinator.h"
#include "check.h"

static void set_byte(bool* field, unsigned char value) { memcpy(field, &value, 1); }

static unsigned char byte_of(const bool* field) {
    unsigned char b;
    memcpy(&b, field, 1);
    return b;
}

static int count_logs(const char* dir) {
    DIR* d = opendir(dir);
    if (d == NULL) return 0;
    int n = 0;
    struct dirent* e;
    while ((e = readdir(d)) != NULL)
        if (strncmp(e->d_name, "backup_error_", 13) == 0) n++;
    closedir(d);
    return n;
}

/* A coordinator as a C caller makes it: malloc, then each field written. */
static SBackupCoordinator* malloc_coordinator(const char* logdir, unsigned char logging,
                                              unsigned char compression, unsigned char encryption) {
    SBackupCoordinator* c = (SBackupCoordinator*)malloc(sizeof(SBackupCoordinator));
    CHECK(c != NULL);
    /* Garbage everywhere first, as malloc may hand out. */
    memset(c, 0xa5, sizeof *c);
    c->config.max_blocks_per_batch = 100;
    c->config.batch_timeout_ms = 1000;
    set_byte(&c->config.enable_compression, compression);
    set_byte(&c->config.enable_encryption, encryption);
    c->config.encryption_key = NULL;
    c->config.error_retry_max = 1;
    c->config.error_retry_interval = 0;
    c->config.error_store_path = (char*)logdir;
    set_byte(&c->config.enable_error_logging, logging);
    c->config.error_buffer_size = 16;
    c->config.backup_path = NULL;
    c->config.backup_max_size = 0;
    c->config.compression_level = 1;
    c->bitmap_engine = NULL;
    c->event_interceptor = NULL;
    c->active_cursor = NULL;
    c->last_error_message = NULL;
    c->error_count = 0;
    c->retry_count = 0;
    c->total_backup_blocks = 0;
    c->total_backup_size = 0;
    c->backup_duration_ms = 0;
    CHECK_EQ_INT(backup_retry_context_init(&c->retry_context, 1, 0), BACKUP_SUCCESS);
    return c;
}

static void test_malloced_bool_bytes(const char* workdir) {
    const unsigned char bytes[] = {2, 0xff, 0x80, 0};
    for (size_t i = 0; i < sizeof bytes; i++) {
        char logdir[512];
        snprintf(logdir, sizeof logdir, "%s/errors_%02x", workdir, bytes[i]);
        SBackupCoordinator* c = malloc_coordinator(logdir, bytes[i], bytes[i], (unsigned char)~bytes[i]);
        backup_record_error(c, BACKUP_ERROR_NETWORK, "bool byte check");
        CHECK_STR_CONTAINS(backup_get_last_error(c), "bool byte check");
        uint64_t errors = 0;
        backup_get_error_stats(c, &errors, NULL);
        CHECK_EQ_INT(errors, 1);
        /* Any non-zero byte enables error logging; zero does not. */
        CHECK_EQ_INT(count_logs(logdir), bytes[i] != 0 ? 1 : 0);
        /* The library leaves the caller's bytes as they were. */
        CHECK_EQ_INT(byte_of(&c->config.enable_error_logging), bytes[i]);
        CHECK_EQ_INT(byte_of(&c->config.enable_compression), bytes[i]);
        backup_coordinator_destroy(c);
    }
    PASS("malloc'd coordinator with bool bytes 2, 0xff, 0x80 and 0");
}

static void test_library_coordinator_bool_bytes(const char* workdir) {
    char logdir[512];
    snprintf(logdir, sizeof logdir, "%s/errors_init", workdir);
    SBackupCoordinatorConfig config;
    memset(&config, 0xff, sizeof config);
    config.encryption_key = NULL;
    config.error_retry_max = 0;
    config.error_retry_interval = 0;
    config.error_store_path = logdir;
    config.error_buffer_size = 8;
    config.backup_path = "backup-path-the-library-copies";
    /* enable_compression, enable_encryption, enable_error_logging: 0xff from the memset. */
    SBackupCoordinator* c = backup_coordinator_init(&config, NULL, NULL);
    CHECK(c != NULL);
    backup_record_error(c, BACKUP_ERROR_DISK_FULL, NULL);
    CHECK_EQ_INT(count_logs(logdir), 1);
    SBackupErrorRecord history[2];
    uint32_t held = 0;
    CHECK_EQ_INT(backup_get_error_history(c, history, 2, &held), BACKUP_SUCCESS);
    CHECK_EQ_INT(held, 1);
    CHECK_EQ_INT(history[0].code, BACKUP_ERROR_DISK_FULL);
    /* The caller resets a count in place: the library reads the coordinator afresh, and
     * still owns its copy of backup_path (the ASan run's leak checker sees a leak otherwise). */
    c->error_count = 0;
    backup_record_error(c, BACKUP_ERROR_NETWORK, NULL);
    uint64_t errors = 99;
    backup_get_error_stats(c, &errors, NULL);
    CHECK_EQ_INT(errors, 1);
    backup_coordinator_destroy(c);
    PASS("library coordinator from a config with bool bytes 0xff");
}

static int32_t always_network(void* user_data) {
    (*(int*)user_data)++;
    return BACKUP_ERROR_NETWORK;
}

static void test_policy_jitter_bytes(void) {
    const unsigned char bytes[] = {2, 0xff, 0};
    for (size_t i = 0; i < sizeof bytes; i++) {
        SRetryPolicy* policy = (SRetryPolicy*)malloc(sizeof(SRetryPolicy));
        CHECK(policy != NULL);
        memset(policy, 0xa5, sizeof *policy);
        policy->max_retry = 2;
        policy->initial_interval_ms = 1;
        policy->max_interval_ms = 2;
        policy->multiplier = 2.0;
        set_byte(&policy->jitter, bytes[i]);
        policy->timeout_ms = 0;
        SRetryContext ctx;
        CHECK_EQ_INT(backup_retry_context_init(&ctx, 0, 0), BACKUP_SUCCESS);
        int attempts = 0;
        CHECK_EQ_INT(backup_execute_with_retry_policy(&ctx, policy, always_network, &attempts),
                     BACKUP_ERROR_RETRY_EXHAUSTED);
        CHECK_EQ_INT(attempts, 3);
        CHECK_EQ_INT(ctx.current_retry, 2);
        backup_retry_context_destroy(&ctx);
        free(policy);
    }
    PASS("retry policy with jitter bytes 2, 0xff and 0");
}

int main(void) {
    char workdir[] = "/tmp/backup_bool_bytes_XXXXXX";
    CHECK(mkdtemp(workdir) != NULL);
    test_malloced_bool_bytes(workdir);
    test_library_coordinator_bool_bytes(workdir);
    test_policy_jitter_bytes();
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", workdir);
    if (system(cmd) != 0) return 1;
    printf("test_bool_bytes: all %d checks passed\n", g_checks);
    return 0;
}
