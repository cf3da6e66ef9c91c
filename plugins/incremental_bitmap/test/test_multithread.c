/* Sixteen threads on every entry point at once: exact counts, no data race, no use after
 * free (run under ASan/UBSan by `make test`); cleanup cancels waits in progress; init and
 * cleanup cycle while other threads call in. */
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>

#include "backup_coordinator.h"
#include "check.h"

#define THREADS 16
#define ROUNDS 200

static char g_dir[64];
static SBackupCoordinator* g_coordinator;

typedef struct {
    int id;
    int attempts;
} Worker;

/* Fails once with a retryable code, then succeeds: exactly one retry per call. */
static int32_t fail_once(void* user_data) {
    Worker* w = (Worker*)user_data;
    return (w->attempts++ % 2 == 0) ? BACKUP_ERROR_NETWORK : BACKUP_SUCCESS;
}

static void* hammer(void* arg) {
    Worker* w = (Worker*)arg;
    char path[128];
    snprintf(path, sizeof path, "%s/thread_%02d.dat", g_dir, w->id);
    for (int i = 0; i < ROUNDS; i++) {
        CHECK_EQ_INT(backup_plugin_execute_with_retry(fail_once, w), BACKUP_SUCCESS);
        backup_plugin_record_error(BACKUP_ERROR_NETWORK, "worker error");
        const char* last = backup_plugin_get_last_error();
        CHECK(last != NULL && strlen(last) > 0);
        uint64_t e, r;
        backup_plugin_get_error_stats(&e, &r);
        CHECK_EQ_INT(backup_plugin_write_file_with_retry(path, &i, sizeof i), BACKUP_SUCCESS);
        backup_record_error(g_coordinator, BACKUP_ERROR_TIMEOUT, NULL);
        CHECK(strlen(backup_get_last_error(g_coordinator)) > 0);
        CHECK_EQ_INT(backup_write_file_with_retry(g_coordinator, path, &i, sizeof i), BACKUP_SUCCESS);
        SBackupErrorRecord rec[2];
        uint32_t held;
        CHECK_EQ_INT(backup_plugin_get_error_history(rec, 2, &held), BACKUP_SUCCESS);
        if (i % 50 == 0) backup_plugin_clear_error();
    }
    return NULL;
}

static void test_exact_counts(void) {
    char config[256];
    int len = snprintf(config, sizeof config,
                       "error_retry_max = 3\nerror_retry_interval = 0\nerror_store_path = \"%s/errors\"\n", g_dir);
    CHECK_EQ_INT(backup_plugin_init(config, (uint32_t)len), BACKUP_SUCCESS);
    SBackupCoordinatorConfig cc = {.error_retry_max = 2, .error_retry_interval = 0, .error_buffer_size = 100};
    g_coordinator = backup_coordinator_init(&cc, NULL, NULL);
    CHECK(g_coordinator != NULL);

    pthread_t threads[THREADS];
    Worker workers[THREADS];
    for (int t = 0; t < THREADS; t++) {
        workers[t] = (Worker){.id = t};
        CHECK(pthread_create(&threads[t], NULL, hammer, &workers[t]) == 0);
    }
    for (int t = 0; t < THREADS; t++) pthread_join(threads[t], NULL);

    uint64_t errors = 0, retries = 0;
    backup_plugin_get_error_stats(&errors, &retries);
    CHECK_EQ_INT(errors, THREADS * ROUNDS);
    CHECK_EQ_INT(retries, THREADS * ROUNDS);
    backup_get_error_stats(g_coordinator, &errors, &retries);
    CHECK_EQ_INT(errors, THREADS * ROUNDS);
    CHECK_EQ_INT(retries, 0);
    CHECK_EQ_INT(g_coordinator->error_count, THREADS * ROUNDS);

    /* Every record_error is one line of the log: count the lines. */
    char cmd[256];
    snprintf(cmd, sizeof cmd, "cat %s/errors/backup_error_*.log | wc -l", g_dir);
    FILE* wc = popen(cmd, "r");
    long lines = 0;
    CHECK(fscanf(wc, "%ld", &lines) == 1);
    pclose(wc);
    CHECK_EQ_INT(lines, THREADS * ROUNDS);

    backup_coordinator_destroy(g_coordinator);
    backup_plugin_cleanup();
    PASS("16 threads, exact counts");
}

static atomic_int g_failed_attempts;

static int32_t always_fails(void* user_data) {
    (void)user_data;
    atomic_fetch_add(&g_failed_attempts, 1);
    return BACKUP_ERROR_CONNECTION_LOST;
}

/* Waits (10 s at most) until `n` attempts have failed, so that cleanup comes while every
 * caller is really in its 60 s wait, however loaded the machine is. */
static void wait_for_failed_attempts(int n) {
    for (int i = 0; i < 10000 && atomic_load(&g_failed_attempts) < n; i++) usleep(1000);
    usleep(20 * 1000);
}

static void* long_wait(void* arg) {
    *(int32_t*)arg = backup_plugin_execute_with_retry(always_fails, NULL);
    return NULL;
}

typedef struct {
    SRetryContext* ctx;
    int32_t result;
} DirectArg;

static void* direct_wait(void* arg) {
    DirectArg* a = (DirectArg*)arg;
    a->result = backup_execute_with_retry(a->ctx, always_fails, NULL);
    return NULL;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void test_cleanup_cancels_waits(void) {
    const char* config = "error_retry_max = 5\nerror_retry_interval = 60\n";
    CHECK_EQ_INT(backup_plugin_init(config, (uint32_t)strlen(config)), BACKUP_SUCCESS);
    int32_t results[4];
    pthread_t threads[4];
    atomic_store(&g_failed_attempts, 0);
    for (int t = 0; t < 4; t++) pthread_create(&threads[t], NULL, long_wait, &results[t]);
    wait_for_failed_attempts(4);
    double start = now_s();
    backup_plugin_cleanup();
    for (int t = 0; t < 4; t++) pthread_join(threads[t], NULL);
    double took = now_s() - start;
    for (int t = 0; t < 4; t++) CHECK_EQ_INT(results[t], BACKUP_ERROR_CANCELLED);
    CHECK(took < 5.0); /* woken at once, not after the 60 s wait */

    /* A retry context used directly (no init needed) is cancelled too. */
    SRetryContext ctx;
    backup_retry_context_init(&ctx, 3, 60);
    DirectArg arg = {.ctx = &ctx};
    pthread_t t;
    atomic_store(&g_failed_attempts, 0);
    pthread_create(&t, NULL, direct_wait, &arg);
    wait_for_failed_attempts(1);
    start = now_s();
    backup_plugin_cleanup();
    pthread_join(t, NULL);
    CHECK(now_s() - start < 5.0);
    CHECK_EQ_INT(arg.result, BACKUP_ERROR_CANCELLED);
    CHECK_EQ_INT(ctx.last_error, BACKUP_ERROR_CONNECTION_LOST);
    CHECK_EQ_INT(ctx.state, RETRY_STATE_FAILED);
    backup_retry_context_destroy(&ctx);
    PASS("cleanup cancels every wait");
}

static atomic_int g_stop;

static int32_t succeed(void* user_data) {
    (void)user_data;
    return BACKUP_SUCCESS;
}

static void* caller(void* arg) {
    (void)arg;
    while (!atomic_load(&g_stop)) {
        int32_t rc = backup_plugin_execute_with_retry(succeed, NULL);
        CHECK(rc == BACKUP_SUCCESS || rc == BACKUP_ERROR_NOT_INITIALIZED);
        backup_plugin_record_error(BACKUP_ERROR_NETWORK, NULL);
        const char* last = backup_plugin_get_last_error();
        CHECK(last != NULL && last[0] != 0);
        uint64_t e, r;
        backup_plugin_get_error_stats(&e, &r);
        backup_plugin_clear_error();
    }
    return NULL;
}

static void test_init_cleanup_cycles(void) {
    pthread_t threads[8];
    atomic_store(&g_stop, 0);
    for (int t = 0; t < 8; t++) pthread_create(&threads[t], NULL, caller, NULL);
    for (int i = 0; i < 300; i++) {
        int32_t rc = backup_plugin_init("error_retry_max = 1", 19);
        CHECK(rc == BACKUP_SUCCESS);
        backup_plugin_cleanup();
    }
    atomic_store(&g_stop, 1);
    for (int t = 0; t < 8; t++) pthread_join(threads[t], NULL);
    PASS("init/cleanup cycles under concurrent callers");
}

int main(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/backup_mt_XXXXXX");
    CHECK(mkdtemp(g_dir) != NULL);
    test_exact_counts();
    test_cleanup_cancels_waits();
    test_init_cleanup_cycles();
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    CHECK(system(cmd) == 0);
    printf("test_multithread: all %d checks passed\n", g_checks);
    return 0;
}
