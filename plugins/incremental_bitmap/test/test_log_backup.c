/* Log-backup commands through the C ABI: a fake task whose state and failures the harness
 * scripts; skip, translate, recover-by-state, exhaustion, timeout, cancellation, records. */
#include <pthread.h>
#include <unistd.h>

#include "backup_coordinator.h"
#include "check.h"

typedef struct {
    ELogBackupKernelState state;
    bool truncated;
    int32_t fail_with; /* execute returns this... */
    int fail_times;    /* ...this many times */
    bool effect_despite_failure;
    int executes;
    ELogSubCommand last_command;
} FakeTask;

static int32_t query(void* user_data, ELogBackupKernelState* state_out, bool* truncated_out) {
    FakeTask* t = (FakeTask*)user_data;
    *state_out = t->state;
    *truncated_out = t->truncated;
    return BACKUP_SUCCESS;
}

static void apply(FakeTask* t, ELogSubCommand c) {
    switch (c) {
        case LOG_SUBCOMMAND_START: case LOG_SUBCOMMAND_RESUME: t->state = LOG_BACKUP_KERNEL_RUNNING; break;
        case LOG_SUBCOMMAND_STOP: t->state = LOG_BACKUP_KERNEL_NOT_EXIST; break;
        case LOG_SUBCOMMAND_PAUSE: t->state = LOG_BACKUP_KERNEL_PAUSED; break;
        case LOG_SUBCOMMAND_TRUNCATE: t->truncated = true; break;
    }
}

static int32_t execute(void* user_data, ELogSubCommand command) {
    FakeTask* t = (FakeTask*)user_data;
    t->executes++;
    t->last_command = command;
    if (t->executes <= t->fail_times) {
        if (t->effect_despite_failure) apply(t, command);
        return t->fail_with;
    }
    apply(t, command);
    return BACKUP_SUCCESS;
}

static const SLogBackupRetryPolicy fast = {.max_retry_times = 5, .min_retry_duration_ms = 1,
                                           .max_retry_duration_ms = 8, .retry_timeout_ms = 60000};

static void test_decision_table(void) {
    SLogBackupDecision d;
    CHECK_EQ_INT(backup_log_check_idempotency(LOG_SUBCOMMAND_START, LOG_BACKUP_KERNEL_PAUSED, false, &d), BACKUP_SUCCESS);
    CHECK(!d.should_skip && d.need_sync && d.actual_command == LOG_SUBCOMMAND_RESUME);
    CHECK_EQ_INT(backup_log_check_idempotency(LOG_SUBCOMMAND_STOP, LOG_BACKUP_KERNEL_NOT_EXIST, false, &d), BACKUP_SUCCESS);
    CHECK(d.should_skip && d.actual_command == -1);
    CHECK_EQ_INT(backup_log_check_idempotency(LOG_SUBCOMMAND_TRUNCATE, LOG_BACKUP_KERNEL_RUNNING, true, &d), BACKUP_SUCCESS);
    CHECK(d.should_skip);
    CHECK_EQ_INT(backup_log_check_idempotency(LOG_SUBCOMMAND_PAUSE, LOG_BACKUP_KERNEL_NOT_EXIST, false, &d), BACKUP_SUCCESS);
    CHECK(!d.should_skip && d.need_sync && d.actual_command == -1);
    CHECK_EQ_INT(backup_log_check_idempotency((ELogSubCommand)9, LOG_BACKUP_KERNEL_RUNNING, false, &d), BACKUP_ERROR_INVALID_PARAM);
    CHECK_EQ_INT(backup_log_check_idempotency(LOG_SUBCOMMAND_START, (ELogBackupKernelState)-1, false, &d), BACKUP_ERROR_INVALID_PARAM);
    CHECK_EQ_INT(backup_log_check_idempotency(LOG_SUBCOMMAND_START, LOG_BACKUP_KERNEL_RUNNING, false, NULL), BACKUP_ERROR_INVALID_PARAM);
    PASS("decision table");
}

static void test_run_command(void) {
    FakeTask t = {.state = LOG_BACKUP_KERNEL_RUNNING};
    CHECK_EQ_INT(backup_log_run_command("t1", LOG_SUBCOMMAND_START, &fast, query, execute, &t), BACKUP_SUCCESS);
    CHECK_EQ_INT(t.executes, 0); /* skipped */

    FakeTask p = {.state = LOG_BACKUP_KERNEL_PAUSED};
    CHECK_EQ_INT(backup_log_run_command("t1", LOG_SUBCOMMAND_START, &fast, query, execute, &p), BACKUP_SUCCESS);
    CHECK_EQ_INT(p.last_command, LOG_SUBCOMMAND_RESUME); /* translated */

    FakeTask r = {.state = LOG_BACKUP_KERNEL_NOT_EXIST, .fail_with = BACKUP_ERROR_NETWORK, .fail_times = 1,
                  .effect_despite_failure = true};
    CHECK_EQ_INT(backup_log_run_command("t1", LOG_SUBCOMMAND_START, &fast, query, execute, &r), BACKUP_SUCCESS);
    CHECK_EQ_INT(r.executes, 1); /* recovered by looking at the state again */

    FakeTask e = {.state = LOG_BACKUP_KERNEL_RUNNING, .fail_with = BACKUP_ERROR_CONNECTION_LOST, .fail_times = 100};
    CHECK_EQ_INT(backup_log_run_command("t2", LOG_SUBCOMMAND_PAUSE, &fast, query, execute, &e), BACKUP_ERROR_RETRY_EXHAUSTED);
    CHECK_EQ_INT(e.executes, 6);
    SLogBackupRetryRecord rec[8];
    uint32_t count = 0;
    CHECK_EQ_INT(backup_log_get_retry_records("t2", LOG_SUBCOMMAND_PAUSE, rec, 8, &count), BACKUP_SUCCESS);
    CHECK_EQ_INT(count, 5);
    CHECK_EQ_INT(rec[0].retry_num, 1);
    CHECK_EQ_INT(rec[4].reason_code, BACKUP_ERROR_CONNECTION_LOST);
    CHECK(rec[4].real_retry_at_ms >= rec[4].expected_retry_at_ms);
    CHECK_STR_CONTAINS(rec[0].original_reason, "pause");
    CHECK_EQ_INT(backup_log_get_retry_records("t2", LOG_SUBCOMMAND_PAUSE, rec, 2, &count), BACKUP_SUCCESS);
    CHECK_EQ_INT(count, 5); /* the total, two copied */
    CHECK_EQ_INT(backup_log_reset_retry_records("t2", LOG_SUBCOMMAND_PAUSE), BACKUP_SUCCESS);
    CHECK_EQ_INT(backup_log_get_retry_records("t2", LOG_SUBCOMMAND_PAUSE, rec, 8, &count), BACKUP_SUCCESS);
    CHECK_EQ_INT(count, 0);

    /* Timeout: waits 100, 200, 400 ms...; a 500 ms budget refuses the third (the second
     * wait ends at 300 ms plus the attempts' time, leaving 200 ms of slack for a loaded
     * machine or a sanitizer build). */
    SLogBackupRetryPolicy tight = {.max_retry_times = 10, .min_retry_duration_ms = 100,
                                   .max_retry_duration_ms = 1000, .retry_timeout_ms = 500};
    FakeTask to = {.state = LOG_BACKUP_KERNEL_RUNNING, .fail_with = BACKUP_ERROR_TIMEOUT, .fail_times = 100};
    CHECK_EQ_INT(backup_log_run_command("t3", LOG_SUBCOMMAND_STOP, &tight, query, execute, &to), BACKUP_ERROR_TIMEOUT);
    CHECK_EQ_INT(to.executes, 3);

    FakeTask bad = {.state = LOG_BACKUP_KERNEL_PAUSED};
    CHECK_EQ_INT(backup_log_run_command("t4", LOG_SUBCOMMAND_TRUNCATE, &fast, query, execute, &bad), BACKUP_ERROR_INVALID_STATE);
    CHECK_EQ_INT(bad.executes, 0);

    FakeTask perm = {.state = LOG_BACKUP_KERNEL_NOT_EXIST, .fail_with = BACKUP_ERROR_PERMISSION_DENIED, .fail_times = 100};
    CHECK_EQ_INT(backup_log_run_command("t5", LOG_SUBCOMMAND_START, &fast, query, execute, &perm), BACKUP_ERROR_PERMISSION_DENIED);
    CHECK_EQ_INT(perm.executes, 1);

    CHECK_EQ_INT(backup_log_run_command(NULL, LOG_SUBCOMMAND_START, &fast, query, execute, &t), BACKUP_ERROR_INVALID_PARAM);
    CHECK_EQ_INT(backup_log_run_command("t", (ELogSubCommand)7, &fast, query, execute, &t), BACKUP_ERROR_INVALID_PARAM);
    CHECK_EQ_INT(backup_log_run_command("t", LOG_SUBCOMMAND_START, &fast, NULL, execute, &t), BACKUP_ERROR_INVALID_PARAM);
    CHECK_STR_CONTAINS(backup_plugin_get_last_error(), "query");
    char long_task[300];
    memset(long_task, 'x', sizeof long_task - 1);
    long_task[299] = 0;
    CHECK_EQ_INT(backup_log_run_command(long_task, LOG_SUBCOMMAND_START, &fast, query, execute, &t), BACKUP_ERROR_INVALID_PARAM);
    CHECK_EQ_INT(backup_log_run_command("\xff\xfe", LOG_SUBCOMMAND_START, &fast, query, execute, &t), BACKUP_ERROR_INVALID_PARAM);
    CHECK_STR_CONTAINS(backup_plugin_get_last_error(), "UTF-8");

    char metrics[32768];
    size_t len = 0;
    CHECK_EQ_INT(backup_plugin_get_metrics(metrics, sizeof metrics, &len), BACKUP_SUCCESS);
    CHECK_STR_CONTAINS(metrics, "backup_log_command_skips_total{command=\"start\"} 1\n");
    CHECK_STR_CONTAINS(metrics, "backup_log_command_retries_total{command=\"pause\",reason=\"-11\"} 5\n");
    CHECK_STR_CONTAINS(metrics, "backup_log_command_state_syncs_total{command=\"start\",state=\"paused\"} 1\n");
    CHECK_STR_CONTAINS(metrics, "backup_log_command_recoveries_total{command=\"start\"} 1\n");
    CHECK_EQ_INT(backup_plugin_get_metrics(metrics, 4, &len), BACKUP_ERROR_INVALID_PARAM);
    CHECK(len > 100);
    PASS("run_command");
}

static void* run_slow(void* arg) {
    static const SLogBackupRetryPolicy slow = {.max_retry_times = 5, .min_retry_duration_ms = 60000,
                                               .max_retry_duration_ms = 60000, .retry_timeout_ms = 600000};
    FakeTask* t = (FakeTask*)arg;
    t->fail_with = backup_log_run_command("slow", LOG_SUBCOMMAND_START, &slow, query, execute, t);
    return NULL;
}

static void test_cancellation(const char* config, int len) {
    FakeTask t = {.state = LOG_BACKUP_KERNEL_NOT_EXIST, .fail_with = BACKUP_ERROR_NETWORK, .fail_times = 100};
    pthread_t thread;
    pthread_create(&thread, NULL, run_slow, &t);
    usleep(200 * 1000);
    backup_plugin_cleanup();
    pthread_join(thread, NULL);
    CHECK_EQ_INT(t.fail_with, BACKUP_ERROR_CANCELLED);
    /* The record stays: a later call resumes the same sequence. */
    CHECK_EQ_INT(backup_plugin_init(config, (uint32_t)len), BACKUP_SUCCESS);
    SLogBackupRetryRecord rec[2];
    uint32_t count = 0;
    CHECK_EQ_INT(backup_log_get_retry_records("slow", LOG_SUBCOMMAND_START, rec, 2, &count), BACKUP_SUCCESS);
    CHECK_EQ_INT(count, 1);
    CHECK_EQ_INT(rec[0].real_retry_at_ms, 0);
    PASS("cleanup cancels a wait and keeps the record");
}

int main(void) {
    char dir[] = "/tmp/backup_log_XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    CHECK_EQ_INT(backup_log_run_command("t", LOG_SUBCOMMAND_START, NULL, query, execute, NULL), BACKUP_ERROR_NOT_INITIALIZED);
    CHECK_EQ_INT(backup_plugin_init("", 0), BACKUP_SUCCESS);
    FakeTask t = {.state = LOG_BACKUP_KERNEL_RUNNING};
    CHECK_EQ_INT(backup_log_run_command("t", LOG_SUBCOMMAND_START, NULL, query, execute, &t), BACKUP_ERROR_INVALID_PARAM);
    CHECK_STR_CONTAINS(backup_plugin_get_last_error(), "state_dir");
    backup_plugin_cleanup();

    char config[256];
    int len = snprintf(config, sizeof config, "state_dir = \"%s/state\"\n", dir);
    CHECK_EQ_INT(backup_plugin_init(config, (uint32_t)len), BACKUP_SUCCESS);
    test_decision_table();
    test_run_command();
    test_cancellation(config, len);
    backup_plugin_cleanup();
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0);
    printf("test_log_backup: all %d checks passed\n", g_checks);
    return 0;
}
