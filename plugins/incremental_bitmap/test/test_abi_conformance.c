/* docs/C_API.md read sentence by sentence: each check below is one promise of the contract, written
 * from its wording alone, the way a host that knows only the page would check it. Every
 * failed promise is printed (not only the first), then the harness exits 1: check.h's EXPECT
 * family. */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "backup_coordinator.h"
#include "check.h"

static char g_dir[64];

static uint64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static uint64_t unix_ms(void) {
    struct timeval tv;
    gettimeofday(&tv, NULL);
    return (uint64_t)tv.tv_sec * 1000u + (uint64_t)tv.tv_usec / 1000u;
}

/* init from a C string, passing its length as taosX does (no NUL). */
static int32_t init_text(const char* text) {
    return backup_plugin_init(text, (uint32_t)strlen(text));
}

/* ---- operations scripted by the harness ---------------------------------------------- */

typedef struct {
    int calls;
    int fail_times;       /* fail this many times... */
    int32_t code;         /* ...with this code, then succeed */
    SRetryContext* ctx;   /* when set, the state seen by each attempt */
    int32_t seen_state[16];
} Script;

static int32_t scripted(void* user_data) {
    Script* s = (Script*)user_data;
    if (s->ctx != NULL && s->calls < 16) s->seen_state[s->calls] = (int32_t)s->ctx->state;
    s->calls++;
    return s->calls <= s->fail_times ? s->code : BACKUP_SUCCESS;
}

/* ---- §1 ------------------------------------------------------------------------------ */

static void section1(void) {
    static const struct { int32_t code; const char* message; } table[] = {
        {0, "Success"}, {-1, "Invalid parameter"}, {-2, "Initialization failed"},
        {-3, "Not initialized"}, {-4, "Memory allocation failed"}, {-5, "File I/O error"},
        {-6, "Network error"}, {-7, "Operation timeout"}, {-8, "Data corruption detected"},
        {-9, "Permission denied"}, {-10, "Disk full"}, {-11, "Connection lost"},
        {-12, "Retry attempts exhausted"}, {-13, "Invalid state for command"},
        {-14, "Operation already in progress"},
        {-15, "Idempotency key reused with different payload"}, {-16, "Operation cancelled"},
        {-17, "Claim lease lost"}, {-18, "Fenced by a newer claim"}, {-99, "Unknown error"},
    };
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        EXPECT_STR(backup_error_string(table[i].code), table[i].message, "§1 message");
    }
    EXPECT_INT(BACKUP_SUCCESS, 0, "§1 value");
    EXPECT_INT(BACKUP_ERROR_INVALID_STATE, -13, "§1 value");
    EXPECT_INT(BACKUP_ERROR_CANCELLED, -16, "§1 value");
    EXPECT_INT(BACKUP_ERROR_LEASE_LOST, -17, "§1 value");
    EXPECT_INT(BACKUP_ERROR_FENCED, -18, "§1 value");
    EXPECT_INT(BACKUP_ERROR_UNKNOWN, -99, "§1 value");
    static const int32_t outside[] = {1, 42, -19, -98, -100, INT32_MIN, INT32_MAX};
    for (size_t i = 0; i < sizeof outside / sizeof outside[0]; i++) {
        EXPECT_STR(backup_error_string(outside[i]), "Unknown error", "§1 outside the table");
    }
    /* Static: the same pointer on every call, and still valid after other calls. */
    const char* first = backup_error_string(BACKUP_ERROR_NETWORK);
    backup_error_string(BACKUP_ERROR_DISK_FULL);
    EXPECT(first == backup_error_string(BACKUP_ERROR_NETWORK), "§1 static string");
    EXPECT_STR(first, "Network error", "§1 static string stays");

    /* Retryable column, through backup_should_retry (retries left). */
    SRetryContext ctx;
    EXPECT_INT(backup_retry_context_init(&ctx, 5, 0), BACKUP_SUCCESS, "§2 init");
    for (size_t i = 0; i < sizeof table / sizeof table[0]; i++) {
        int32_t c = table[i].code;
        bool retryable = c == -5 || c == -6 || c == -7 || c == -11;
        EXPECTF(backup_should_retry(&ctx, c) == retryable, "§1 retryable column of %d", c);
    }
    EXPECT(!backup_should_retry(&ctx, 42), "§1 a code outside the table is not retryable");
    EXPECT(!backup_should_retry(&ctx, -19), "§1 a code outside the table is not retryable");

    /* An operation's code outside the table: non-retryable, returned as it is. */
    Script s = {.fail_times = 100, .code = 42};
    EXPECT_INT(backup_execute_with_retry(&ctx, scripted, &s), 42, "§1 outside code returned as is");
    EXPECT_INT(s.calls, 1, "§1 outside code not retried");
    EXPECT_INT(ctx.state, RETRY_STATE_FAILED, "§1 outside code: FAILED");
    EXPECT_STR(ctx.error_message, "Unknown error", "§1/§2 message of an outside code");
    Script s2 = {.fail_times = 100, .code = -19};
    EXPECT_INT(backup_execute_with_retry(&ctx, scripted, &s2), -19, "§1 outside code -19 as is");
    EXPECT_INT(s2.calls, 1, "§1 -19 not retried");
    backup_retry_context_destroy(&ctx);
    PASS("§1 error codes");
}

/* ---- §2 ------------------------------------------------------------------------------ */

static void section2(void) {
    SRetryContext ctx;
    memset(&ctx, 0xAB, sizeof ctx); /* uninitialized memory, as after malloc */
    EXPECT_INT(backup_retry_context_init(&ctx, 3, 7), BACKUP_SUCCESS, "§2 init");
    EXPECT_INT(ctx.current_retry, 0, "§2 init current_retry");
    EXPECT_INT(ctx.max_retry, 3, "§2 init max_retry");
    EXPECT_INT(ctx.retry_interval, 7, "§2 init retry_interval");
    EXPECT_INT(ctx.state, RETRY_STATE_IDLE, "§2 init IDLE");
    EXPECT(ctx.error_message == NULL, "§2 init: no message");
    EXPECT_INT(backup_retry_context_init(NULL, 1, 1), BACKUP_ERROR_INVALID_PARAM, "§2 init NULL");
    backup_retry_context_destroy(NULL); /* no crash */

    Script s = {0};
    EXPECT_INT(backup_execute_with_retry(NULL, scripted, &s), BACKUP_ERROR_INVALID_PARAM,
               "§2 NULL context");
    EXPECT_INT(backup_execute_with_retry(&ctx, NULL, &s), BACKUP_ERROR_INVALID_PARAM, "§2 NULL op");
    EXPECT_INT(s.calls, 0, "§2 NULL op: nothing run");

    /* Success at once. */
    ctx.retry_interval = 0;
    s = (Script){.ctx = &ctx};
    EXPECT_INT(backup_execute_with_retry(&ctx, scripted, &s), BACKUP_SUCCESS, "§2 success");
    EXPECT_INT(ctx.state, RETRY_STATE_SUCCESS, "§2 SUCCESS");
    EXPECT_INT(s.seen_state[0], RETRY_STATE_RETRYING, "§2 RETRYING while the first attempt runs");
    EXPECT_INT(ctx.current_retry, 0, "§2 no retry");
    EXPECT(ctx.error_message == NULL, "§2 message NULL after a success");

    /* Non-retryable: at once, one attempt. */
    s = (Script){.fail_times = 100, .code = BACKUP_ERROR_PERMISSION_DENIED};
    EXPECT_INT(backup_execute_with_retry(&ctx, scripted, &s), BACKUP_ERROR_PERMISSION_DENIED,
               "§2 non-retryable returned");
    EXPECT_INT(s.calls, 1, "§2 one attempt");
    EXPECT_INT(ctx.state, RETRY_STATE_FAILED, "§2 FAILED");
    EXPECT_INT(ctx.last_error, BACKUP_ERROR_PERMISSION_DENIED, "§2 last_error");
    EXPECT_STR(ctx.error_message, "Permission denied", "§2 message of the failed attempt");

    /* Exhaustion. */
    uint64_t before = unix_ms();
    s = (Script){.fail_times = 100, .code = BACKUP_ERROR_NETWORK, .ctx = &ctx};
    EXPECT_INT(backup_execute_with_retry(&ctx, scripted, &s), BACKUP_ERROR_RETRY_EXHAUSTED,
               "§2 EXHAUSTED");
    EXPECT_INT(s.calls, 4, "§2 first attempt + max_retry retries");
    EXPECT_INT(ctx.current_retry, 3, "§2 current_retry == max_retry");
    EXPECT_INT(ctx.last_error, BACKUP_ERROR_NETWORK, "§2 last_error holds the op's code");
    EXPECT_INT(ctx.state, RETRY_STATE_FAILED, "§2 FAILED after exhaustion");
    EXPECT_STR(ctx.error_message, "Network error", "§2 message after EXHAUSTED");
    EXPECT(ctx.last_retry_time >= before && ctx.last_retry_time <= unix_ms() + 1,
           "§2 last_retry_time is unix ms of the last retry");
    EXPECT_INT(s.seen_state[1], RETRY_STATE_RETRYING, "§2 RETRYING during retries");

    /* Success after failures: message back to NULL, count kept. */
    s = (Script){.fail_times = 2, .code = BACKUP_ERROR_CONNECTION_LOST};
    EXPECT_INT(backup_execute_with_retry(&ctx, scripted, &s), BACKUP_SUCCESS, "§2 recovered");
    EXPECT_INT(ctx.current_retry, 2, "§2 retries of this execution");
    EXPECT(ctx.error_message == NULL, "§2 message NULL after success");
    EXPECT_INT(ctx.state, RETRY_STATE_SUCCESS, "§2 SUCCESS after retries");

    /* max_retry 0: one attempt, then EXHAUSTED. */
    SRetryContext zero;
    backup_retry_context_init(&zero, 0, 0);
    s = (Script){.fail_times = 100, .code = BACKUP_ERROR_TIMEOUT};
    EXPECT_INT(backup_execute_with_retry(&zero, scripted, &s), BACKUP_ERROR_RETRY_EXHAUSTED,
               "§2 max_retry 0");
    EXPECT_INT(s.calls, 1, "§2 max_retry 0: one attempt");
    EXPECT_INT(zero.last_error, BACKUP_ERROR_TIMEOUT, "§2 max_retry 0 last_error");
    EXPECT_STR(zero.error_message, "Operation timeout", "§2 max_retry 0 message");
    backup_retry_context_destroy(&zero);

    /* The interval is seconds between attempts. */
    SRetryContext one;
    backup_retry_context_init(&one, 1, 1);
    uint64_t t0 = now_ms();
    s = (Script){.fail_times = 100, .code = BACKUP_ERROR_FILE_IO};
    EXPECT_INT(backup_execute_with_retry(&one, scripted, &s), BACKUP_ERROR_RETRY_EXHAUSTED,
               "§2 1 s interval");
    EXPECT(now_ms() - t0 >= 990, "§2 retry_interval is seconds");
    backup_retry_context_destroy(&one);

    /* should_retry. */
    SRetryContext q;
    backup_retry_context_init(&q, 2, 0);
    EXPECT(backup_should_retry(&q, BACKUP_ERROR_NETWORK), "§2 should_retry: retries left");
    q.current_retry = 2;
    EXPECT(!backup_should_retry(&q, BACKUP_ERROR_NETWORK), "§2 should_retry: none left");
    EXPECT(!backup_should_retry(NULL, BACKUP_ERROR_NETWORK), "§2 should_retry NULL");

    /* wait_for_retry: seconds, sets last_retry_time. */
    q.retry_interval = 0;
    q.last_retry_time = 0;
    t0 = now_ms();
    before = unix_ms();
    backup_wait_for_retry(&q);
    EXPECT(now_ms() - t0 < 500, "§2 interval 0: no wait");
    EXPECT(q.last_retry_time >= before, "§2 wait_for_retry sets last_retry_time");
    q.retry_interval = 1;
    t0 = now_ms();
    backup_wait_for_retry(&q);
    EXPECT(now_ms() - t0 >= 990, "§2 wait_for_retry waits retry_interval seconds");
    backup_wait_for_retry(NULL);
    backup_retry_context_destroy(&q);

    /* The extended policy. */
    SRetryPolicy p = {.max_retry = 10, .initial_interval_ms = 100, .max_interval_ms = 0,
                      .multiplier = 1.0, .jitter = false, .timeout_ms = 250};
    s = (Script){.fail_times = 100, .code = BACKUP_ERROR_NETWORK};
    t0 = now_ms();
    EXPECT_INT(backup_execute_with_retry_policy(&ctx, &p, scripted, &s), BACKUP_ERROR_TIMEOUT,
               "§2 budget: TIMEOUT");
    uint64_t took = now_ms() - t0;
    EXPECT_INT(s.calls, 3, "§2 budget: waits ending at 100 and 200 ms, not 300");
    /* 200 ms of waits; the slack is the scheduler's, a third wait would end at 300 ms. */
    EXPECT(took < 300, "§2 no wait ends past the budget; TIMEOUT at once");
    EXPECT_INT(ctx.last_error, BACKUP_ERROR_NETWORK, "§2 TIMEOUT with last_error set");
    EXPECT_STR(ctx.error_message, "Network error", "§2 message after TIMEOUT");
    EXPECT_INT(ctx.state, RETRY_STATE_FAILED, "§2 FAILED after TIMEOUT");

    /* max_interval_ms 0: no cap (20+40+80+160 = 300 ms), against a 20 ms cap (80 ms). */
    SRetryPolicy nocap = {.max_retry = 4, .initial_interval_ms = 20, .max_interval_ms = 0,
                          .multiplier = 2.0};
    s = (Script){.fail_times = 100, .code = BACKUP_ERROR_NETWORK};
    t0 = now_ms();
    EXPECT_INT(backup_execute_with_retry_policy(&ctx, &nocap, scripted, &s),
               BACKUP_ERROR_RETRY_EXHAUSTED, "§2 policy exhausted");
    EXPECT(now_ms() - t0 >= 298, "§2 max_interval_ms 0 means no cap");
    EXPECT_INT(ctx.current_retry, 4, "§2 policy: current_retry == max_retry");
    EXPECT_STR(ctx.error_message, "Network error", "§2 policy EXHAUSTED message");
    SRetryPolicy cap = nocap;
    cap.max_interval_ms = 20;
    s = (Script){.fail_times = 100, .code = BACKUP_ERROR_NETWORK};
    t0 = now_ms();
    backup_execute_with_retry_policy(&ctx, &cap, scripted, &s);
    EXPECT(now_ms() - t0 < 240, "§2 max_interval_ms caps one wait");
    EXPECT_INT(backup_execute_with_retry_policy(&ctx, NULL, scripted, &s),
               BACKUP_ERROR_INVALID_PARAM, "§2 NULL policy");
    EXPECT_INT(backup_execute_with_retry_policy(NULL, &p, scripted, &s),
               BACKUP_ERROR_INVALID_PARAM, "§2 policy NULL context");
    EXPECT_INT(backup_execute_with_retry_policy(&ctx, &p, NULL, &s), BACKUP_ERROR_INVALID_PARAM,
               "§2 policy NULL op");
    /* A policy's success leaves no message. */
    s = (Script){.fail_times = 1, .code = BACKUP_ERROR_NETWORK};
    SRetryPolicy quick = {.max_retry = 2, .multiplier = 1.0};
    EXPECT_INT(backup_execute_with_retry_policy(&ctx, &quick, scripted, &s), BACKUP_SUCCESS,
               "§2 policy success");
    EXPECT(ctx.error_message == NULL, "§2 policy: message NULL after success");
    /* Non-retryable under a policy. */
    s = (Script){.fail_times = 100, .code = BACKUP_ERROR_DISK_FULL};
    EXPECT_INT(backup_execute_with_retry_policy(&ctx, &quick, scripted, &s), BACKUP_ERROR_DISK_FULL,
               "§2 policy non-retryable");
    EXPECT_INT(s.calls, 1, "§2 policy non-retryable: one attempt");
    backup_retry_context_destroy(&ctx);
    PASS("§2 retry context");
}

/* A cleanup wakes a direct wait (backup_wait_for_retry), even with no plugin initialized. */
static void* wait_long(void* arg) {
    SRetryContext* ctx = (SRetryContext*)arg;
    backup_wait_for_retry(ctx);
    return NULL;
}

static void section2_cancel(void) {
    SRetryContext ctx;
    backup_retry_context_init(&ctx, 1, 30);
    pthread_t t;
    uint64_t t0 = now_ms();
    pthread_create(&t, NULL, wait_long, &ctx);
    usleep(200 * 1000);
    backup_plugin_cleanup();
    pthread_join(t, NULL);
    EXPECT(now_ms() - t0 < 5000, "§2 backup_wait_for_retry is cancellable by cleanup");
    backup_retry_context_destroy(&ctx);
    PASS("§2 waits are cancellable");
}

/* ---- §3 ------------------------------------------------------------------------------ */

static int count_prefix(const char* dir, const char* prefix) {
    DIR* d = opendir(dir);
    if (d == NULL) return -1;
    int n = 0;
    struct dirent* e;
    while ((e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, prefix, strlen(prefix)) == 0) n++;
    }
    closedir(d);
    return n;
}

static int count_entries(const char* dir) {
    DIR* d = opendir(dir);
    if (d == NULL) return -1;
    int n = 0;
    struct dirent* e;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0) n++;
    }
    closedir(d);
    return n;
}

/* The text of the only (or the newest) backup_error_*.log of dir. */
static size_t read_log(const char* dir, char* out, size_t cap, char* name_out) {
    DIR* d = opendir(dir);
    out[0] = 0;
    if (d == NULL) return 0;
    char best[256] = "";
    struct dirent* e;
    while ((e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, "backup_error_", 13) == 0 && strcmp(e->d_name, best) > 0) {
            snprintf(best, sizeof best, "%s", e->d_name);
        }
    }
    closedir(d);
    if (best[0] == 0) return 0;
    if (name_out) strcpy(name_out, best);
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, best);
    FILE* f = fopen(path, "r");
    if (f == NULL) return 0;
    size_t n = fread(out, 1, cap - 1, f);
    out[n] = 0;
    fclose(f);
    return n;
}

static void section3(void) {
    char errdir[128], path[512], buf[4096];
    snprintf(errdir, sizeof errdir, "%s/coord_errors", g_dir);

    /* init copies the strings: the caller's buffers may change afterwards. */
    char store[128];
    snprintf(store, sizeof store, "%s", errdir);
    char key[] = "k3y-never-logged";
    SBackupCoordinatorConfig cfg = {.error_retry_max = 2, .error_retry_interval = 0,
                                    .error_store_path = store, .enable_error_logging = true,
                                    .error_buffer_size = 10, .encryption_key = key,
                                    .compression_level = 3, .backup_max_size = 1024};
    uint64_t before_init = unix_ms();
    SBackupCoordinator* c = backup_coordinator_init(&cfg, NULL, NULL);
    EXPECT(c != NULL, "§3 init");
    if (c == NULL) return;
    EXPECT(c->config.error_store_path != store, "§3 strings copied");
    memset(store, 0, sizeof store);
    EXPECT_STR(c->config.error_store_path, errdir, "§3 copy survives the caller's buffer");
    EXPECT_INT(c->config.error_retry_max, 2, "§3 config kept");
    EXPECT_INT(c->config.compression_level, 3, "§3 config kept");
    EXPECT(c->bitmap_engine == NULL && c->event_interceptor == NULL, "§3 opaque NULLs");
    EXPECT_STR(backup_get_last_error(c), "Success", "§3 \"Success\" when none");
    uint64_t errors = 99, retries = 99;
    backup_get_error_stats(c, &errors, &retries);
    EXPECT_INT(errors, 0, "§3 fresh error_count");
    EXPECT_INT(retries, 0, "§3 fresh retry_count");

    /* record with NULL message: the code's message, a log line, counted. */
    uint64_t before = unix_ms();
    backup_record_error(c, BACKUP_ERROR_FILE_IO, NULL);
    uint64_t after_record = unix_ms();
    EXPECT_STR(backup_get_last_error(c), "File I/O error", "§3 NULL message: the code's own");
    backup_get_error_stats(c, &errors, &retries);
    EXPECT_INT(errors, 1, "§3 error_count counts recorded errors");
    EXPECT_INT(c->error_count, 1, "§3 error_count field");
    EXPECT_STR(c->last_error_message, "File I/O error", "§3 last_error_message field");
    char name[256] = "";
    read_log(errdir, buf, sizeof buf, name);
    unsigned long long ms = 0;
    int code = 0;
    char msg[256] = "";
    EXPECT(sscanf(buf, "[%llu] Error %d: %255[^\n]", &ms, &code, msg) == 3, "§6 line format");
    EXPECT(ms >= before && ms <= after_record, "§6 line's unix ms");
    EXPECT_INT(code, BACKUP_ERROR_FILE_IO, "§6 line's code");
    EXPECT_STR(msg, "File I/O error", "§6 line's message");
    EXPECT(strlen(buf) > 0 && buf[strlen(buf) - 1] == '\n', "§6 line ends in \\n");
    unsigned long long created = 0;
    EXPECT(sscanf(name, "backup_error_%llu.log", &created) == 1, "§6 file name");
    /* The line is stamped when recorded; its file may be created a moment later. */
    EXPECT(created >= before_init && created <= after_record, "§6 file named by its creation ms");
    struct stat st;
    EXPECT(stat(errdir, &st) == 0 && (st.st_mode & 07777) == 0750, "§6 directory 0750");
    snprintf(path, sizeof path, "%s/%s", errdir, name);
    EXPECT(stat(path, &st) == 0 && (st.st_mode & 07777) == 0640, "§6 file 0640");

    backup_record_error(c, BACKUP_ERROR_NETWORK, "taosd down");
    EXPECT_STR(backup_get_last_error(c), "taosd down", "§3 message kept");
    backup_clear_error(c);
    EXPECT_STR(backup_get_last_error(c), "Success", "§3 clear_error");
    backup_get_error_stats(c, &errors, NULL);
    EXPECT_INT(errors, 2, "§3 clear keeps counts");

    /* write_file_with_retry. */
    snprintf(path, sizeof path, "%s/data.bin", g_dir);
    EXPECT_INT(backup_write_file_with_retry(c, path, "hello", 5), BACKUP_SUCCESS, "§3 write");
    FILE* f = fopen(path, "r");
    size_t n = f ? fread(buf, 1, sizeof buf, f) : 0;
    if (f) fclose(f);
    EXPECT(n == 5 && memcmp(buf, "hello", 5) == 0, "§3 file content");
    EXPECT_INT(backup_write_file_with_retry(c, path, "x", 1), BACKUP_SUCCESS, "§3 replace");
    f = fopen(path, "r");
    n = f ? fread(buf, 1, sizeof buf, f) : 0;
    if (f) fclose(f);
    EXPECT(n == 1 && buf[0] == 'x', "§3 replaced whole");
    EXPECT_INT(backup_write_file_with_retry(c, path, NULL, 0), BACKUP_SUCCESS, "§3 empty data");

    /* Paths naming no file: INVALID_PARAM at once, never retried. */
    c->retry_context.retry_interval = 1;
    const char* bad[] = {"", "/tmp/", "/tmp/.", "/tmp/..", ".", "..", "dir/"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        backup_get_error_stats(c, &errors, &retries);
        uint64_t t0 = now_ms();
        int32_t rc = backup_write_file_with_retry(c, bad[i], "x", 1);
        uint64_t e2, r2;
        backup_get_error_stats(c, &e2, &r2);
        EXPECTF(rc == BACKUP_ERROR_INVALID_PARAM && r2 == retries && now_ms() - t0 <= 500 &&
                    e2 == errors + 1,
                "§3 path \"%s\": rc %d, retries %llu->%llu, errors %llu->%llu", bad[i], rc,
                (unsigned long long)retries, (unsigned long long)r2, (unsigned long long)errors,
                (unsigned long long)e2);
    }
    EXPECT_INT(backup_write_file_with_retry(c, NULL, "x", 1), BACKUP_ERROR_INVALID_PARAM,
               "§3 NULL path");
    c->retry_context.retry_interval = 0;

    /* A directory that does not exist: FILE_IO after max_retry retries, counted. */
    backup_get_error_stats(c, &errors, &retries);
    snprintf(path, sizeof path, "%s/missing/dir/f", g_dir);
    EXPECT_INT(backup_write_file_with_retry(c, path, "x", 1), BACKUP_ERROR_RETRY_EXHAUSTED,
               "§3 retried FILE_IO ends EXHAUSTED");
    uint64_t e2, r2;
    backup_get_error_stats(c, &e2, &r2);
    EXPECT_INT(r2 - retries, 2, "§3 retry_count counts retries performed");
    EXPECT_INT(e2 - errors, 1, "§3 final failure recorded once");
    EXPECT_INT(c->retry_context.last_error, BACKUP_ERROR_FILE_IO, "§3 retry_context last_error");
    EXPECT_INT(c->retry_count, r2, "§3 retry_count field");
    /* Rename onto a directory fails: no temp file stays. */
    char sub[160];
    snprintf(sub, sizeof sub, "%s/wdir", g_dir);
    mkdir(sub, 0755);
    snprintf(path, sizeof path, "%s/wdir/target", g_dir);
    mkdir(path, 0755);
    int32_t rc = backup_write_file_with_retry(c, path, "x", 1);
    EXPECT(rc != BACKUP_SUCCESS, "§3 cannot replace a directory");
    EXPECT_INT(count_entries(sub), 1, "§3 a failed attempt leaves no temp file");
    backup_record_error(NULL, BACKUP_ERROR_NETWORK, "x"); /* no crash */
    backup_get_error_stats(NULL, &errors, &retries);
    backup_clear_error(NULL);
    EXPECT_INT(backup_write_file_with_retry(NULL, path, "x", 1), BACKUP_ERROR_INVALID_PARAM,
               "§3 NULL coordinator");
    backup_coordinator_destroy(c);
    backup_coordinator_destroy(NULL);

    /* The key is never logged. */
    DIR* d = opendir(errdir);
    struct dirent* e;
    while (d && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "%s/%s", errdir, e->d_name);
        f = fopen(path, "r");
        n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
        if (f) fclose(f);
        buf[n] = 0;
        EXPECT(strstr(buf, "k3y-never-logged") == NULL, "§3 encryption_key never logged");
    }
    if (d) closedir(d);

    /* A coordinator the caller allocated, with literal strings. */
    SBackupCoordinator* m = malloc(sizeof *m);
    memset(m, 0, sizeof *m);
    m->config.error_store_path = "/nonexistent-literal";
    m->config.enable_error_logging = false;
    m->config.encryption_key = "literal";
    m->config.backup_path = "literal";
    EXPECT_INT(backup_retry_context_init(&m->retry_context, 1, 0), BACKUP_SUCCESS, "§3 malloc'd");
    backup_record_error(m, BACKUP_ERROR_NETWORK, NULL);
    EXPECT_STR(backup_get_last_error(m), "Network error", "§3 malloc'd coordinator records");
    snprintf(path, sizeof path, "%s/m.bin", g_dir);
    EXPECT_INT(backup_write_file_with_retry(m, path, "m", 1), BACKUP_SUCCESS, "§3 malloc'd write");
    backup_get_error_stats(m, &errors, &retries);
    EXPECT_INT(errors, 1, "§3 malloc'd error_count");
    EXPECT_INT(m->error_count, 1, "§3 malloc'd error_count field");
    backup_coordinator_destroy(m); /* must not free the literals */
    PASS("§3 coordinator");
}

/* ---- §4 before init ------------------------------------------------------------------- */

static int32_t ok_op(void* u) { (void)u; return 0; }
static int32_t q_running(void* u, ELogBackupKernelState* s, bool* t) {
    (void)u; *s = LOG_BACKUP_KERNEL_RUNNING; *t = false; return 0;
}
static int32_t exec_ok(void* u, ELogSubCommand c) { (void)u; (void)c; return 0; }

static void section4_before_init(void) {
    EXPECT_STR(backup_plugin_name(), "incremental_bitmap_backup", "§4 name");
    EXPECT(backup_plugin_version() != NULL && backup_plugin_version()[0] != 0, "§4 version");
    EXPECT_STR(backup_plugin_get_last_error(), "Plugin not initialized", "§4 before init");
    uint64_t e = 7, r = 7;
    backup_plugin_get_error_stats(&e, &r);
    EXPECT(e == 0 && r == 0, "§4 stats before init");
    char p[256];
    snprintf(p, sizeof p, "%s/before", g_dir);
    EXPECT_INT(backup_plugin_write_file_with_retry(p, "x", 1), BACKUP_ERROR_NOT_INITIALIZED,
               "§4 write before init");
    EXPECT_INT(backup_plugin_execute_with_retry(ok_op, NULL), BACKUP_ERROR_NOT_INITIALIZED,
               "§4 execute before init");
    EXPECT_INT(backup_log_run_command("t", LOG_SUBCOMMAND_START, NULL, q_running, exec_ok, NULL),
               BACKUP_ERROR_NOT_INITIALIZED, "§4 run_command before init");
    SLogBackupRetryRecord rec[2];
    uint32_t count = 0;
    EXPECT_INT(backup_log_get_retry_records("t", LOG_SUBCOMMAND_START, rec, 2, &count),
               BACKUP_ERROR_NOT_INITIALIZED, "§4 get records before init");
    EXPECT_INT(backup_log_reset_retry_records("t", LOG_SUBCOMMAND_START),
               BACKUP_ERROR_NOT_INITIALIZED, "§4 reset before init");
    EXPECT_INT(backup_execute_idempotent("k", "f", 1, ok_op, NULL, NULL),
               BACKUP_ERROR_NOT_INITIALIZED, "§4 idempotent before init");
    EXPECT_INT(backup_idempotency_forget("k"), BACKUP_ERROR_NOT_INITIALIZED, "§4 forget before init");
    /* Parameter checks come first. */
    EXPECT_INT(backup_plugin_write_file_with_retry(NULL, "x", 1), BACKUP_ERROR_INVALID_PARAM,
               "§4 params first: write");
    EXPECT_INT(backup_plugin_write_file_with_retry("", "x", 1), BACKUP_ERROR_INVALID_PARAM,
               "§4 params first: write empty path");
    EXPECT_INT(backup_plugin_write_file_with_retry("/tmp/", "x", 1), BACKUP_ERROR_INVALID_PARAM,
               "§4 params first: write dir path");
    EXPECT_INT(backup_plugin_execute_with_retry(NULL, NULL), BACKUP_ERROR_INVALID_PARAM,
               "§4 params first: execute");
    EXPECT_INT(backup_log_run_command(NULL, LOG_SUBCOMMAND_START, NULL, q_running, exec_ok, NULL),
               BACKUP_ERROR_INVALID_PARAM, "§4 params first: run_command");
    EXPECT_INT(backup_log_run_command("t", (ELogSubCommand)9, NULL, q_running, exec_ok, NULL),
               BACKUP_ERROR_INVALID_PARAM, "§4 params first: run_command command");
    EXPECT_INT(backup_log_get_retry_records("t", LOG_SUBCOMMAND_START, rec, 2, NULL),
               BACKUP_ERROR_INVALID_PARAM, "§4 params first: get records");
    EXPECT_INT(backup_log_reset_retry_records(NULL, LOG_SUBCOMMAND_START),
               BACKUP_ERROR_INVALID_PARAM, "§4 params first: reset");
    EXPECT_INT(backup_execute_idempotent(NULL, "f", 1, ok_op, NULL, NULL),
               BACKUP_ERROR_INVALID_PARAM, "§4 params first: idempotent");
    EXPECT_INT(backup_execute_idempotent("", "f", 1, ok_op, NULL, NULL),
               BACKUP_ERROR_INVALID_PARAM, "§4 params first: idempotent empty key");
    EXPECT_INT(backup_execute_idempotent("k", "f", 1, NULL, NULL, NULL),
               BACKUP_ERROR_INVALID_PARAM, "§4 params first: idempotent op");
    EXPECT_INT(backup_idempotency_forget(NULL), BACKUP_ERROR_INVALID_PARAM, "§4 params first: forget");
    EXPECT_STR(backup_plugin_get_last_error(), "Plugin not initialized",
               "§4 still not initialized after failed calls");
    backup_plugin_get_error_stats(&e, &r);
    EXPECT(e == 0 && r == 0, "§4 nothing counted before init");
    backup_plugin_record_error(BACKUP_ERROR_NETWORK, "x"); /* no crash, no init */
    backup_plugin_clear_error();
    EXPECT_STR(backup_plugin_get_last_error(), "Plugin not initialized", "§4 record before init");
    /* Things that need no init. */
    SLogBackupDecision dec;
    EXPECT_INT(backup_log_check_idempotency(LOG_SUBCOMMAND_START, LOG_BACKUP_KERNEL_NOT_EXIST, false, &dec),
               BACKUP_SUCCESS, "§4 decision needs no init");
    PASS("§4 before init");
}

/* ---- §4 lifecycle, counts --------------------------------------------------------------- */

static void section4_lifecycle(void) {
    char text[512];
    /* NULL with 0, and empty: defaults. */
    EXPECT_INT(backup_plugin_init(NULL, 0), BACKUP_SUCCESS, "§4 NULL/0 init");
    EXPECT_STR(backup_plugin_get_last_error(), "Success", "§4 Success after init");
    EXPECT_INT(backup_plugin_init("", 0), BACKUP_ERROR_INIT_FAILED, "§4 second init");
    EXPECT_INT(backup_plugin_execute_with_retry(ok_op, NULL), BACKUP_SUCCESS,
               "§4 instance still works after a refused second init");
    backup_plugin_cleanup();
    EXPECT_STR(backup_plugin_get_last_error(), "Plugin not initialized", "§4 after cleanup");
    EXPECT_INT(backup_plugin_init("", 0), BACKUP_SUCCESS, "§4 empty init");
    backup_plugin_cleanup();

    /* A failed init's reason stays until the next init or cleanup, whatever is called. */
    EXPECT_INT(init_text("error_retry_max = \"ten\"\n"), BACKUP_ERROR_INVALID_PARAM, "§4 bad init");
    char reason[512];
    snprintf(reason, sizeof reason, "%s", backup_plugin_get_last_error());
    EXPECT_HAS(reason, "error_retry_max", "§4 reason names the key");
    EXPECT_HAS(reason, "ten", "§4 reason names the bad value");
    EXPECT_INT(backup_plugin_execute_with_retry(ok_op, NULL), BACKUP_ERROR_NOT_INITIALIZED,
               "§4 failed init: not initialized");
    EXPECT_INT(backup_plugin_write_file_with_retry(NULL, "x", 1), BACKUP_ERROR_INVALID_PARAM,
               "§4 failed init: params first");
    backup_plugin_record_error(-6, "x");
    backup_plugin_clear_error();
    uint64_t e = 1, r = 1;
    backup_plugin_get_error_stats(&e, &r);
    EXPECT_STR(backup_plugin_get_last_error(), reason, "§4 reason kept until next init/cleanup");
    EXPECT(e == 0 && r == 0, "§4 failed init records nothing");
    backup_plugin_cleanup();
    EXPECT_STR(backup_plugin_get_last_error(), "Plugin not initialized", "§4 cleanup drops reason");
    EXPECT_INT(init_text("no_such_key = 1"), BACKUP_ERROR_INVALID_PARAM, "§4 bad init 2");
    EXPECT_HAS(backup_plugin_get_last_error(), "no_such_key", "§4 unknown key named");
    EXPECT_INT(init_text(""), BACKUP_SUCCESS, "§4 next init after failure");
    EXPECT_STR(backup_plugin_get_last_error(), "Success", "§4 next init replaces reason");
    backup_plugin_cleanup();

    /* Counts: retried attempts change nothing; one error per failed call. */
    int len = snprintf(text, sizeof text,
                       "error_retry_max = 3\nerror_retry_interval = \"1ms\"\n");
    EXPECT_INT(backup_plugin_init(text, (uint32_t)len), BACKUP_SUCCESS, "§4 init");
    Script s = {.fail_times = 2, .code = BACKUP_ERROR_NETWORK};
    EXPECT_INT(backup_plugin_execute_with_retry(scripted, &s), BACKUP_SUCCESS, "§4 execute");
    backup_plugin_get_error_stats(&e, &r);
    EXPECT_INT(e, 0, "§4 retried attempts are no errors");
    EXPECT_INT(r, 2, "§4 retry_count");
    EXPECT_STR(backup_plugin_get_last_error(), "Success", "§4 retried attempts leave last error");
    s = (Script){.fail_times = 100, .code = BACKUP_ERROR_CONNECTION_LOST};
    EXPECT_INT(backup_plugin_execute_with_retry(scripted, &s), BACKUP_ERROR_RETRY_EXHAUSTED,
               "§4 configured policy exhausted");
    EXPECT_INT(s.calls, 4, "§4 configured error_retry_max");
    backup_plugin_get_error_stats(&e, &r);
    EXPECT_INT(e, 1, "§4 one error per call");
    EXPECT_INT(r, 5, "§4 retries of both calls");
    EXPECT(strcmp(backup_plugin_get_last_error(), "Success") != 0, "§4 failure sets last error");
    s = (Script){.fail_times = 100, .code = BACKUP_ERROR_DATA_CORRUPTION};
    EXPECT_INT(backup_plugin_execute_with_retry(scripted, &s), BACKUP_ERROR_DATA_CORRUPTION,
               "§4 permanent code returned");
    backup_plugin_get_error_stats(&e, &r);
    EXPECT_INT(e, 2, "§4 permanent failure counted");
    EXPECT_INT(backup_plugin_execute_with_retry(NULL, NULL), BACKUP_ERROR_INVALID_PARAM,
               "§4 NULL op after init");
    backup_plugin_get_error_stats(&e, &r);
    EXPECT_INT(e, 3, "§4 a call ending INVALID_PARAM is counted");
    backup_plugin_record_error(BACKUP_ERROR_DISK_FULL, NULL);
    EXPECT_STR(backup_plugin_get_last_error(), "Disk full", "§4 record NULL message");
    backup_plugin_record_error(BACKUP_ERROR_NETWORK, "link down");
    EXPECT_STR(backup_plugin_get_last_error(), "link down", "§4 record message");
    backup_plugin_get_error_stats(&e, &r);
    EXPECT_INT(e, 5, "§4 record_error counted");
    backup_plugin_get_error_stats(NULL, NULL);
    backup_plugin_clear_error();
    EXPECT_STR(backup_plugin_get_last_error(), "Success", "§4 clear_error");

    /* Direct contexts and coordinators do not touch the plugin's counts. */
    SRetryContext ctx;
    backup_retry_context_init(&ctx, 2, 0);
    s = (Script){.fail_times = 100, .code = BACKUP_ERROR_NETWORK};
    backup_execute_with_retry(&ctx, scripted, &s);
    backup_retry_context_destroy(&ctx);
    SBackupCoordinatorConfig cfg = {.error_retry_max = 1};
    SBackupCoordinator* c = backup_coordinator_init(&cfg, NULL, NULL);
    backup_record_error(c, -6, NULL);
    backup_coordinator_destroy(c);
    uint64_t e2, r2;
    backup_plugin_get_error_stats(&e2, &r2);
    EXPECT(e2 == e && r2 == r, "§4 contexts and coordinators keep their own counts");

    /* Calls needing a state_dir: INVALID_PARAM naming state_dir, every one the same way. */
    SLogBackupRetryRecord rec[2];
    uint32_t count;
    int32_t rcs[5];
    const char* names[5] = {"run_command", "get_retry_records", "reset_retry_records",
                            "execute_idempotent", "idempotency_forget"};
    backup_plugin_clear_error();
    rcs[0] = backup_log_run_command("t", LOG_SUBCOMMAND_START, NULL, q_running, exec_ok, NULL);
    char msg0[512];
    snprintf(msg0, sizeof msg0, "%s", backup_plugin_get_last_error());
    rcs[1] = backup_log_get_retry_records("t", LOG_SUBCOMMAND_START, rec, 2, &count);
    char msg1[512];
    snprintf(msg1, sizeof msg1, "%s", backup_plugin_get_last_error());
    rcs[2] = backup_log_reset_retry_records("t", LOG_SUBCOMMAND_START);
    char msg2[512];
    snprintf(msg2, sizeof msg2, "%s", backup_plugin_get_last_error());
    rcs[3] = backup_execute_idempotent("k", "f", 1, ok_op, NULL, NULL);
    char msg3[512];
    snprintf(msg3, sizeof msg3, "%s", backup_plugin_get_last_error());
    rcs[4] = backup_idempotency_forget("k");
    char msg4[512];
    snprintf(msg4, sizeof msg4, "%s", backup_plugin_get_last_error());
    const char* msgs[5] = {msg0, msg1, msg2, msg3, msg4};
    for (int i = 0; i < 5; i++) {
        EXPECTF(rcs[i] == BACKUP_ERROR_INVALID_PARAM && strstr(msgs[i], "state_dir") != NULL,
                "§4 %s without state_dir: %d \"%s\"", names[i], rcs[i], msgs[i]);
    }
    backup_plugin_cleanup();
    PASS("§4 lifecycle");
}

/* A plugin-level wait is cancelled by cleanup. */
static void* plugin_exec_thread(void* arg) {
    int32_t* rc = (int32_t*)arg;
    Script s = {.fail_times = 1000, .code = BACKUP_ERROR_NETWORK};
    *rc = backup_plugin_execute_with_retry(scripted, &s);
    return NULL;
}

static void section4_cancel(void) {
    EXPECT_INT(init_text("error_retry_max = 5\nerror_retry_interval = 30\n"), BACKUP_SUCCESS,
               "§4 init for cancel");
    int32_t rc = 1;
    pthread_t t;
    uint64_t t0 = now_ms();
    pthread_create(&t, NULL, plugin_exec_thread, &rc);
    usleep(200 * 1000);
    backup_plugin_cleanup();
    pthread_join(t, NULL);
    EXPECT_INT(rc, BACKUP_ERROR_CANCELLED, "§4 cleanup cancels a wait");
    EXPECT(now_ms() - t0 < 5000, "§4 at once");
    EXPECT_STR(backup_plugin_get_last_error(), "Plugin not initialized", "§4 after cleanup");
    PASS("§4 cancel");
}

/* ---- §5 ------------------------------------------------------------------------------ */

static void expect_init(const char* text, int32_t expected, const char* needle, const char* what) {
    int32_t rc = init_text(text);
    g_checks++;
    if (rc != expected) {
        FAILURE("§5 %s: init returned %d, expected %d; last error \"%s\"", what, rc, expected,
                backup_plugin_get_last_error());
    } else if (needle != NULL && strstr(backup_plugin_get_last_error(), needle) == NULL) {
        FAILURE("§5 %s: last error \"%s\" lacks \"%s\"", what, backup_plugin_get_last_error(),
                needle);
    }
    backup_plugin_cleanup();
}

static void section5(void) {
    char t[2048];
    /* Every key of the table with a valid value. */
    snprintf(t, sizeof t,
             "enable = true\nerror_retry_max = 10\nerror_retry_interval = 5\n"
             "error_retry_max_interval = \"5m\"\nerror_retry_multiplier = 1.0\n"
             "error_retry_jitter = false\nerror_retry_timeout = 0\n"
             "error_store_path = \"%s/k_err\"\nenable_error_logging = true\n"
             "error_buffer_size = 1000\nerror_log_rotation_size = \"64MB\"\n"
             "error_log_rotation_count = 30\nstate_dir = \"%s/k_state\"\n"
             "idempotency_ttl = \"24h\"\nidempotency_lease = \"90s\"\n"
             "max_blocks_per_batch = 100\nbatch_timeout_ms = 5000\nenable_compression = true\n"
             "enable_encryption = false\nencryption_key = \"abc\"\nbackup_path = \"/tmp/bp\"\n"
             "backup_max_size = \"1GB\"\ncompression_level = 9\nlog_path = \"%s/k_log\"\n"
             "log_level = \"info\"\nstate_backend = \"file\"\n"
             "etcd_endpoints = [\"http://127.0.0.1:2379\"]\netcd_prefix = \"/taosx/backup/\"\n"
             "etcd_timeout = \"5s\"\netcd_user = \"u\"\netcd_password = \"p\"\n",
             g_dir, g_dir, g_dir);
    expect_init(t, BACKUP_SUCCESS, NULL, "every key");
    /* The same under the section. */
    char u[2300];
    snprintf(u, sizeof u, "[plugins.incremental_bitmap]\n%s", t);
    expect_init(u, BACKUP_SUCCESS, NULL, "every key under the section");
    /* taosX's section as written (its error_store_path is created: removed again after
     * when it was not there before). */
    struct stat st;
    bool parent_existed = stat("/var/log/taosx", &st) == 0;
    bool dir_existed = stat("/var/log/taosx/backup_errors", &st) == 0;
    expect_init("[plugins.incremental_bitmap]\nenable = true\nerror_retry_max = 10\n"
                "error_retry_interval = 5\nerror_store_path = \"/var/log/taosx/backup_errors\"\n"
                "enable_error_logging = true\nerror_buffer_size = 1000\n",
                BACKUP_SUCCESS, NULL, "taosX section as written");
    if (!dir_existed) rmdir("/var/log/taosx/backup_errors");
    if (!parent_existed) rmdir("/var/log/taosx");
    /* Dotted forms. */
    snprintf(t, sizeof t, "error.retry.max = 3\nerror.retry.interval = \"250ms\"\n"
             "log.path = \"%s/d_log\"\nlog.level = \"debug\"\n"
             "etcd.endpoints = [\"http://127.0.0.1:2379\"]\netcd.prefix = \"/p/\"\n"
             "etcd.timeout = \"2s\"\n", g_dir);
    expect_init(t, BACKUP_SUCCESS, NULL, "dotted forms");
    snprintf(u, sizeof u, "[plugins.incremental_bitmap]\n%s", t);
    expect_init(u, BACKUP_SUCCESS, NULL, "dotted forms under the section");
    snprintf(t, sizeof t, "[error.retry]\nmax = 3\ninterval = 1\n[log]\npath = \"%s/d2\"\n"
             "level = \"warn\"\n[etcd]\nendpoints = [\"http://h:1\"]\nprefix = \"/q/\"\n"
             "timeout = 3\n", g_dir);
    expect_init(t, BACKUP_SUCCESS, NULL, "dotted forms as tables");
    /* Durations and sizes. */
    const char* durations[] = {"250ms", "5s", "30m", "24h"};
    for (int i = 0; i < 4; i++) {
        snprintf(t, sizeof t, "error_retry_interval = \"%s\"\nerror_retry_timeout = \"%s\"\n"
                 "idempotency_ttl = \"%s\"\netcd_timeout = \"%s\"\n",
                 durations[i], durations[i], durations[i], durations[i]);
        expect_init(t, BACKUP_SUCCESS, NULL, durations[i]);
    }
    const char* sizes[] = {"512KB", "64MB", "1GB"};
    for (int i = 0; i < 3; i++) {
        snprintf(t, sizeof t, "error_log_rotation_size = \"%s\"\nbackup_max_size = \"%s\"\n",
                 sizes[i], sizes[i]);
        expect_init(t, BACKUP_SUCCESS, NULL, sizes[i]);
    }
    expect_init("error_log_rotation_size = 1048576\nbackup_max_size = 0\n", BACKUP_SUCCESS, NULL,
                "integer sizes");
    expect_init("error_retry_interval = \"5 parsecs\"", BACKUP_ERROR_INVALID_PARAM,
                "error_retry_interval", "bad duration");
    expect_init("backup_max_size = \"lots\"", BACKUP_ERROR_INVALID_PARAM, "backup_max_size",
                "bad size");
    const char* levels[] = {"error", "warn", "info", "debug", "trace",
                            "backup_coordinator=debug"};
    for (int i = 0; i < 6; i++) {
        snprintf(t, sizeof t, "log_level = \"%s\"\n", levels[i]);
        expect_init(t, BACKUP_SUCCESS, NULL, levels[i]);
    }
    expect_init("log_level = \"loud\"", BACKUP_ERROR_INVALID_PARAM, "log_level", "bad level");
    expect_init("compression_level = 10", BACKUP_ERROR_INVALID_PARAM, "compression_level",
                "compression_level 0-9");
    expect_init("compression_level = 0", BACKUP_SUCCESS, NULL, "compression_level 0");
    expect_init("enable = \"yes\"", BACKUP_ERROR_INVALID_PARAM, "enable", "enable is a bool");
    expect_init("max_blocks_per_batch = \"many\"", BACKUP_ERROR_INVALID_PARAM,
                "max_blocks_per_batch", "validated by type");
    expect_init("enable_compression = 1", BACKUP_ERROR_INVALID_PARAM, "enable_compression",
                "validated by type");
    expect_init("state_backend = \"etcd\"", BACKUP_ERROR_INVALID_PARAM, "etcd_endpoints",
                "etcd needs endpoints");
    expect_init("state_backend = \"etcd\"\netcd_endpoints = [\"http://127.0.0.1:1\"]\n",
                BACKUP_SUCCESS, NULL, "init does not need the cluster");
    expect_init("state_backend = \"redis\"", BACKUP_ERROR_INVALID_PARAM, "state_backend",
                "state_backend values");
    expect_init("etcd_ca_file = \"/nonexistent/ca.pem\"\n", BACKUP_SUCCESS, NULL,
                "TLS keys accepted (file backend)");
    /* Secrets. */
    int32_t rc = init_text("encryption_key = \"hunter2-secret\"\nbogus = 1\n");
    EXPECT_INT(rc, BACKUP_ERROR_INVALID_PARAM, "§5 unknown key beside a secret");
    EXPECT(strstr(backup_plugin_get_last_error(), "hunter2-secret") == NULL,
           "§5 encryption_key never in a message");
    backup_plugin_cleanup();
    rc = init_text("etcd_password = 12345678\n");
    EXPECT_INT(rc, BACKUP_ERROR_INVALID_PARAM, "§5 etcd_password of a wrong type");
    EXPECT(strstr(backup_plugin_get_last_error(), "12345678") == NULL,
           "§5 etcd_password never in a message");
    backup_plugin_cleanup();
    rc = init_text("encryption_key = \"unterminated-secret\n");
    EXPECT(strstr(backup_plugin_get_last_error(), "unterminated-secret") == NULL,
           "§5 a secret's syntax error never shows it");
    backup_plugin_cleanup();
    /* Unknown keys; [plugins] rules. */
    expect_init("error_retry_maxx = 3", BACKUP_ERROR_INVALID_PARAM, "error_retry_maxx",
                "unknown key named");
    expect_init("[plugins.incremental_bitmap]\nerror_retry_maxx = 3", BACKUP_ERROR_INVALID_PARAM,
                "error_retry_maxx", "unknown key in the section named");
    expect_init("[plugins.other]\nanything = 1\n[plugins.incremental_bitmap]\nerror_retry_max = 1\n",
                BACKUP_SUCCESS, NULL, "other plugins' tables");
    expect_init("[plugins]\nstray = 1\n", BACKUP_ERROR_INVALID_PARAM, "stray",
                "key straight under [plugins]");
    expect_init("[[plugins.incremental_bitmap]]\nerror_retry_max = 1\n",
                BACKUP_ERROR_INVALID_PARAM, "plugins.incremental_bitmap", "array of tables");
    expect_init("plugins.incremental_bitmap = 1\n", BACKUP_ERROR_INVALID_PARAM,
                "plugins.incremental_bitmap", "non-table section");
    expect_init("[server]\nport = 6060\n", BACKUP_ERROR_INVALID_PARAM, "server",
                "another top-level table is unknown");
    /* NULs. */
    const char with_nul[] = "error_retry_max = 3\n\0\0";
    EXPECT_INT(backup_plugin_init(with_nul, sizeof with_nul), BACKUP_SUCCESS,
               "§5 trailing NULs ignored");
    backup_plugin_cleanup();
    const char strlen1[] = "error_retry_max = 3";
    EXPECT_INT(backup_plugin_init(strlen1, (uint32_t)strlen(strlen1) + 1), BACKUP_SUCCESS,
               "§5 strlen + 1");
    backup_plugin_cleanup();
    const char mid_nul[] = "error_retry_max = 3\n\0error_retry_interval = 1\n";
    EXPECT_INT(backup_plugin_init(mid_nul, sizeof mid_nul - 1), BACKUP_ERROR_INVALID_PARAM,
               "§5 NUL elsewhere");
    backup_plugin_cleanup();
    /* Length-delimited: bytes past config_len are not read. */
    const char longer[] = "error_retry_max = 3\ngarbage here";
    EXPECT_INT(backup_plugin_init(longer, 20), BACKUP_SUCCESS, "§5 config_len bounds the text");
    backup_plugin_cleanup();
    /* Syntax error: line and column. */
    rc = init_text("error_retry_max = 3\nerror_retry_interval = = 5\n");
    EXPECT_INT(rc, BACKUP_ERROR_INVALID_PARAM, "§5 syntax error");
    EXPECT_HAS(backup_plugin_get_last_error(), "line 2", "§5 syntax error's line");
    EXPECT_HAS(backup_plugin_get_last_error(), "column", "§5 syntax error's column");
    backup_plugin_cleanup();
    /* Directories. */
    char file[256];
    snprintf(file, sizeof file, "%s/plainfile", g_dir);
    FILE* f = fopen(file, "w");
    if (f) fclose(f);
    const char* dirkeys[] = {"error_store_path", "state_dir", "log_path"};
    for (int i = 0; i < 3; i++) {
        snprintf(t, sizeof t, "%s = \"%s/sub\"\n", dirkeys[i], file);
        rc = init_text(t);
        EXPECT_INT(rc, BACKUP_ERROR_INVALID_PARAM, "§5 directory under a file");
        EXPECT_HAS(backup_plugin_get_last_error(), dirkeys[i], "§5 directory error names the key");
        EXPECT_HAS(backup_plugin_get_last_error(), "Not a directory", "§5 OS reason");
        backup_plugin_cleanup();
        snprintf(t, sizeof t, "%s = \"%s\"\n", dirkeys[i], file);
        rc = init_text(t);
        EXPECT_INT(rc, BACKUP_ERROR_INVALID_PARAM, "§5 a file is not a directory");
        EXPECT_HAS(backup_plugin_get_last_error(), dirkeys[i], "§5 names the key");
        EXPECT_HAS(backup_plugin_get_last_error(), "Not a directory", "§5 OS reason (file)");
        backup_plugin_cleanup();
        char made[256];
        snprintf(made, sizeof made, "%s/made_%d/deep", g_dir, i);
        snprintf(t, sizeof t, "%s = \"%s\"\n", dirkeys[i], made);
        mode_t old = umask(0);
        rc = init_text(t);
        umask(old);
        EXPECT_INT(rc, BACKUP_SUCCESS, "§5 missing directory created");
        struct stat st;
        EXPECT(stat(made, &st) == 0 && S_ISDIR(st.st_mode) && (st.st_mode & 07777) == 0750,
               "§5 created 0750 whatever the umask");
        backup_plugin_cleanup();
    }
    expect_init("idempotency_lease = \"500ms\"", BACKUP_ERROR_INVALID_PARAM, "idempotency_lease",
                "lease at least 1s");
    expect_init("idempotency_lease = \"1s\"", BACKUP_SUCCESS, NULL, "lease 1s");
    expect_init("error_retry_max = 1e308", BACKUP_ERROR_INVALID_PARAM, "1e308",
                "values echoed as written");
    expect_init("error_retry_max = -1", BACKUP_ERROR_INVALID_PARAM, "-1", "negative echoed");
    expect_init("error_retry_max = 3\nerror.retry.max = 4\n", BACKUP_ERROR_INVALID_PARAM,
                "error", "key given twice");
    /* Refused by the TOML parser itself: still an invalid config that names its key. */
    expect_init("[plugins.incremental_bitmap]\nerror_retry_max = 99999999999999999999\n",
                BACKUP_ERROR_INVALID_PARAM, "error_retry_max", "integer beyond 64 bits names its key");
    expect_init("[plugins.incremental_bitmap]\nenable = true\nenable = false\n",
                BACKUP_ERROR_INVALID_PARAM, "enable", "duplicate key names it");
    PASS("§5 config");
}

/* What an operation that always fails with NETWORK did under a configured policy. */
typedef struct {
    int32_t rc;
    int calls;
    uint64_t took_ms;
} FailingRun;

/* Inits the plugin with `config`, runs the failing operation once, and cleans up. */
static FailingRun run_failing(const char* config, const char* what) {
    EXPECT_INT(init_text(config), BACKUP_SUCCESS, what);
    Script s = {.fail_times = 100, .code = BACKUP_ERROR_NETWORK};
    uint64_t t0 = now_ms();
    FailingRun run = {.rc = backup_plugin_execute_with_retry(scripted, &s)};
    run.took_ms = now_ms() - t0;
    run.calls = s.calls;
    backup_plugin_cleanup();
    return run;
}

/* The configured policy takes sizes and durations as strings. */
static void section5_effect(void) {
    FailingRun run = run_failing("[plugins.incremental_bitmap]\nerror.retry.max = 2\n"
                                 "error.retry.interval = \"200ms\"\n",
                                 "§5 init");
    EXPECT_INT(run.rc, BACKUP_ERROR_RETRY_EXHAUSTED, "§5 error.retry.max");
    EXPECT_INT(run.calls, 3, "§5 error.retry.max = 2");
    EXPECT(run.took_ms >= 395 && run.took_ms < 2000, "§5 error.retry.interval = \"200ms\"");
    /* Multiplier with the default 5m cap, and the timeout. */
    run = run_failing("error_retry_max = 10\nerror_retry_interval = \"100ms\"\n"
                      "error_retry_timeout = \"250ms\"\n",
                      "§5 init timeout");
    EXPECT_INT(run.rc, BACKUP_ERROR_TIMEOUT, "§5 error_retry_timeout");
    EXPECT(run.took_ms < 300, "§5 no wait ends past the budget");
    EXPECT_INT(run.calls, 3, "§5 timeout attempts");
    /* 20 + 60 + 180 = 260 ms without a cap, 60 ms with a 20 ms cap. */
    run = run_failing("error_retry_max = 3\nerror_retry_interval = \"20ms\"\n"
                      "error_retry_multiplier = 3.0\nerror_retry_max_interval = 0\n",
                      "§5 init no cap");
    EXPECT(run.took_ms >= 258, "§5 error_retry_max_interval 0 = no cap; multiplier");
    run = run_failing("error_retry_max = 3\nerror_retry_interval = \"20ms\"\n"
                      "error_retry_multiplier = 3.0\nerror_retry_max_interval = \"20ms\"\n",
                      "§5 init cap");
    EXPECT(run.took_ms < 200, "§5 error_retry_max_interval caps");
    PASS("§5 configured policy");
}

/* ---- §6 ------------------------------------------------------------------------------ */

static void section6(void) {
    char dir[256], t[512], path[512];
    snprintf(dir, sizeof dir, "%s/rot", g_dir);
    mkdir(dir, 0750);
    /* Files of another writer, older, in the same directory: counted with ours. */
    for (int i = 0; i < 3; i++) {
        snprintf(path, sizeof path, "%s/backup_error_%d.log", dir, 1000 + i);
        FILE* f = fopen(path, "w");
        if (f) { fputs("[1] Error -6: old\n", f); fclose(f); }
    }
    snprintf(t, sizeof t, "error_store_path = \"%s\"\nerror_log_rotation_size = \"1KB\"\n"
             "error_log_rotation_count = 3\n", dir);
    EXPECT_INT(init_text(t), BACKUP_SUCCESS, "§6 init");
    char msg[200];
    memset(msg, 'm', sizeof msg - 1);
    msg[sizeof msg - 1] = 0;
    for (int i = 0; i < 60; i++) {
        backup_plugin_record_error(BACKUP_ERROR_NETWORK, msg);
        if (i % 10 == 0) usleep(2000);
    }
    int files = count_prefix(dir, "backup_error_");
    EXPECT(files >= 1 && files <= 3, "§6 count over the whole directory");
    snprintf(path, sizeof path, "%s/backup_error_1000.log", dir);
    EXPECT(access(path, F_OK) != 0, "§6 old files beyond the count deleted");
    /* Every file of ours stays at most about the rotation size. */
    DIR* d = opendir(dir);
    struct dirent* e;
    while (d && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        struct stat st;
        stat(path, &st);
        EXPECT(st.st_size <= 1024 + 256, "§6 rolls by size");
        EXPECT((st.st_mode & 07777) == 0640, "§6 rolled files 0640");
    }
    if (d) closedir(d);
    backup_plugin_cleanup();
    /* Logging off: no file. */
    snprintf(dir, sizeof dir, "%s/off", g_dir);
    snprintf(t, sizeof t, "error_store_path = \"%s\"\nenable_error_logging = false\n", dir);
    EXPECT_INT(init_text(t), BACKUP_SUCCESS, "§6 init off");
    backup_plugin_record_error(BACKUP_ERROR_NETWORK, NULL);
    EXPECT(count_prefix(dir, "backup_error_") <= 0, "§6 logging off writes no file");
    backup_plugin_cleanup();
    PASS("§6 error log");
}

/* ---- §7 ------------------------------------------------------------------------------ */

static void section7_table(void) {
    /* -2: sync none INVALID_STATE (need_sync, -1); -3: sync none; -1 skip; >=0 run. */
    enum { SKIP = -1, SYNC = -3, INVAL = -2 };
    typedef struct { int32_t act; bool sync; } Cell;
    /* rows: START STOP PAUSE RESUME TRUNCATE; cols NOT_EXIST RUNNING PAUSED UNKNOWN */
    const Cell cells[5][4] = {
        {{LOG_SUBCOMMAND_START, false}, {SKIP, false}, {LOG_SUBCOMMAND_RESUME, true}, {SYNC, true}},
        {{SKIP, false}, {LOG_SUBCOMMAND_STOP, false}, {LOG_SUBCOMMAND_STOP, false}, {SYNC, true}},
        {{INVAL, true}, {LOG_SUBCOMMAND_PAUSE, false}, {SKIP, false}, {SYNC, true}},
        {{LOG_SUBCOMMAND_START, true}, {SKIP, false}, {LOG_SUBCOMMAND_RESUME, false}, {SYNC, true}},
        {{INVAL, true}, {LOG_SUBCOMMAND_TRUNCATE, false}, {INVAL, true}, {SYNC, true}},
    };
    const ELogBackupKernelState cols[4] = {LOG_BACKUP_KERNEL_NOT_EXIST, LOG_BACKUP_KERNEL_RUNNING,
                                           LOG_BACKUP_KERNEL_PAUSED, LOG_BACKUP_KERNEL_UNKNOWN};
    for (int cmd = 0; cmd < 5; cmd++) {
        for (int col = 0; col < 4; col++) {
            for (int tr = 0; tr < 2; tr++) {
                SLogBackupDecision d;
                memset(&d, 0x55, sizeof d);
                int32_t rc = backup_log_check_idempotency((ELogSubCommand)cmd, cols[col], tr, &d);
                Cell c = cells[cmd][col];
                bool skip = c.act == SKIP;
                int32_t act = c.act >= 0 ? c.act : -1;
                if (cmd == LOG_SUBCOMMAND_TRUNCATE && col == 1 && tr) { skip = true; act = -1; }
                EXPECTF(rc == BACKUP_SUCCESS && d.should_skip == skip && d.need_sync == c.sync &&
                            d.actual_command == act,
                        "§7 table cmd %d state %d truncated %d: rc %d skip %d sync %d act %d", cmd,
                        cols[col], tr, rc, d.should_skip, d.need_sync, d.actual_command);
            }
        }
    }
    SLogBackupDecision d;
    EXPECT_INT(backup_log_check_idempotency((ELogSubCommand)5, LOG_BACKUP_KERNEL_RUNNING, false, &d),
               BACKUP_ERROR_INVALID_PARAM, "§7 command out of range");
    EXPECT_INT(backup_log_check_idempotency((ELogSubCommand)-1, LOG_BACKUP_KERNEL_RUNNING, false, &d),
               BACKUP_ERROR_INVALID_PARAM, "§7 command -1");
    EXPECT_INT(backup_log_check_idempotency(LOG_SUBCOMMAND_STOP, (ELogBackupKernelState)4, false, &d),
               BACKUP_ERROR_INVALID_PARAM, "§7 state out of range");
    EXPECT_INT(backup_log_check_idempotency(LOG_SUBCOMMAND_STOP, LOG_BACKUP_KERNEL_RUNNING, false, NULL),
               BACKUP_ERROR_INVALID_PARAM, "§7 NULL out");
    PASS("§7 decisions");
}

typedef struct {
    ELogBackupKernelState state;
    int32_t query_fail;  /* query returns this while query_fails > 0 */
    int query_fails;
    int32_t exec_fail;
    int exec_fails;
    int queries, executes;
    int32_t last_cmd;
} Task;

static int32_t tq(void* u, ELogBackupKernelState* s, bool* tr) {
    Task* t = (Task*)u;
    t->queries++;
    if (t->query_fails > 0) { t->query_fails--; return t->query_fail; }
    *s = t->state;
    *tr = false;
    return 0;
}

static int32_t tx(void* u, ELogSubCommand c) {
    Task* t = (Task*)u;
    t->executes++;
    t->last_cmd = c;
    if (t->exec_fails > 0) { t->exec_fails--; return t->exec_fail; }
    if (c == LOG_SUBCOMMAND_START || c == LOG_SUBCOMMAND_RESUME) t->state = LOG_BACKUP_KERNEL_RUNNING;
    if (c == LOG_SUBCOMMAND_STOP) t->state = LOG_BACKUP_KERNEL_NOT_EXIST;
    if (c == LOG_SUBCOMMAND_PAUSE) t->state = LOG_BACKUP_KERNEL_PAUSED;
    return 0;
}

typedef struct { Task task; int32_t rc; const char* name; } Runner;

static void* run_slow(void* arg) {
    Runner* r = (Runner*)arg;
    static const SLogBackupRetryPolicy slow = {.max_retry_times = 3, .min_retry_duration_ms = 30000};
    r->rc = backup_log_run_command(r->name, LOG_SUBCOMMAND_STOP, &slow, tq, tx, &r->task);
    return NULL;
}

static void section7_run(void) {
    char t[512];
    snprintf(t, sizeof t, "state_dir = \"%s/state7\"\n", g_dir);
    EXPECT_INT(init_text(t), BACKUP_SUCCESS, "§7 init");
    const SLogBackupRetryPolicy fast = {.max_retry_times = 3, .min_retry_duration_ms = 1,
                                        .max_retry_duration_ms = 2, .retry_timeout_ms = 60000};
    Task a = {.state = LOG_BACKUP_KERNEL_RUNNING};
    EXPECT_INT(backup_log_run_command("a", LOG_SUBCOMMAND_START, &fast, tq, tx, &a), BACKUP_SUCCESS,
               "§7 skip");
    EXPECT_INT(a.executes, 0, "§7 skip: no execute");
    Task b = {.state = LOG_BACKUP_KERNEL_NOT_EXIST};
    EXPECT_INT(backup_log_run_command("b", LOG_SUBCOMMAND_RESUME, &fast, tq, tx, &b), BACKUP_SUCCESS,
               "§7 RESUME on NOT_EXIST runs START");
    EXPECT_INT(b.last_cmd, LOG_SUBCOMMAND_START, "§7 translated");
    Task c = {.state = LOG_BACKUP_KERNEL_NOT_EXIST};
    EXPECT_INT(backup_log_run_command("c", LOG_SUBCOMMAND_PAUSE, &fast, tq, tx, &c),
               BACKUP_ERROR_INVALID_STATE, "§7 INVALID_STATE");
    EXPECT_INT(c.executes, 0, "§7 INVALID_STATE runs nothing");
    /* UNKNOWN is retried and recorded with BACKUP_ERROR_UNKNOWN. */
    Task u = {.state = LOG_BACKUP_KERNEL_UNKNOWN};
    EXPECT_INT(backup_log_run_command("u", LOG_SUBCOMMAND_STOP, &fast, tq, tx, &u),
               BACKUP_ERROR_RETRY_EXHAUSTED, "§7 UNKNOWN retried until exhausted");
    EXPECT_INT(u.queries, 4, "§7 UNKNOWN: first + 3 retries");
    SLogBackupRetryRecord rec[8];
    uint32_t count = 99;
    EXPECT_INT(backup_log_get_retry_records("u", LOG_SUBCOMMAND_STOP, rec, 8, &count), BACKUP_SUCCESS,
               "§7 records");
    EXPECT_INT(count, 3, "§7 records of the exhausted sequence");
    if (count >= 1) EXPECT_INT(rec[0].reason_code, BACKUP_ERROR_UNKNOWN, "§7 UNKNOWN recorded");
    if (count >= 1) EXPECT(rec[0].original_reason[0] != 0, "§7 a reason");
    count = 99;
    EXPECT_INT(backup_log_get_retry_records("u", LOG_SUBCOMMAND_STOP, NULL, 0, &count),
               BACKUP_SUCCESS, "§7 capacity 0 with out NULL");
    EXPECT_INT(count, 3, "§7 count_out is the total");
    memset(rec, 0x7f, sizeof rec);
    EXPECT_INT(backup_log_get_retry_records("u", LOG_SUBCOMMAND_STOP, rec, 1, &count), BACKUP_SUCCESS,
               "§7 capacity 1");
    EXPECT_INT(count, 3, "§7 total with capacity 1");
    EXPECT_INT(rec[1].retry_num, 0x7f7f7f7f, "§7 min(total, capacity) copied");
    EXPECT_INT(backup_log_get_retry_records("u", LOG_SUBCOMMAND_STOP, NULL, 2, &count),
               BACKUP_ERROR_INVALID_PARAM, "§7 NULL out with capacity");
    /* Query failing: retryable retried, permanent ends. */
    Task qf = {.state = LOG_BACKUP_KERNEL_RUNNING, .query_fail = BACKUP_ERROR_NETWORK, .query_fails = 1};
    EXPECT_INT(backup_log_run_command("qf", LOG_SUBCOMMAND_STOP, &fast, tq, tx, &qf), BACKUP_SUCCESS,
               "§7 retryable query failure retried");
    Task qp = {.state = LOG_BACKUP_KERNEL_RUNNING, .query_fail = BACKUP_ERROR_PERMISSION_DENIED,
               .query_fails = 5};
    EXPECT_INT(backup_log_run_command("qp", LOG_SUBCOMMAND_STOP, &fast, tq, tx, &qp),
               BACKUP_ERROR_PERMISSION_DENIED, "§7 permanent query failure ends");
    EXPECT_INT(qp.executes, 0, "§7 nothing executed");
    /* Success clears the records. */
    Task s = {.state = LOG_BACKUP_KERNEL_RUNNING, .exec_fail = BACKUP_ERROR_NETWORK, .exec_fails = 2};
    EXPECT_INT(backup_log_run_command("s", LOG_SUBCOMMAND_STOP, &fast, tq, tx, &s), BACKUP_SUCCESS,
               "§7 success after retries");
    EXPECT_INT(backup_log_get_retry_records("s", LOG_SUBCOMMAND_STOP, rec, 8, &count), BACKUP_SUCCESS,
               "§7 records after success");
    EXPECT_INT(count, 0, "§7 success clears the records");
    /* A zero policy field takes its default; NULL policy: defaults (5 retries at 30 s). */
    /* Reset: removes, and a finished sequence is replaced by a new one. */
    EXPECT_INT(backup_log_reset_retry_records("u", LOG_SUBCOMMAND_STOP), BACKUP_SUCCESS, "§7 reset");
    EXPECT_INT(backup_log_get_retry_records("u", LOG_SUBCOMMAND_STOP, rec, 8, &count), BACKUP_SUCCESS,
               "§7 after reset");
    EXPECT_INT(count, 0, "§7 reset removes");
    EXPECT_INT(backup_log_reset_retry_records("never", LOG_SUBCOMMAND_STOP), BACKUP_SUCCESS,
               "§7 reset of nothing");
    /* Two calls for the same (task, command): the second IN_PROGRESS at once; reset refused. */
    Runner r = {.task = {.state = LOG_BACKUP_KERNEL_RUNNING, .exec_fail = BACKUP_ERROR_NETWORK,
                         .exec_fails = 100}, .name = "busy"};
    pthread_t th;
    pthread_create(&th, NULL, run_slow, &r);
    usleep(300 * 1000);
    Task other = {.state = LOG_BACKUP_KERNEL_RUNNING};
    uint64_t t0 = now_ms();
    EXPECT_INT(backup_log_run_command("busy", LOG_SUBCOMMAND_STOP, &fast, tq, tx, &other),
               BACKUP_ERROR_IN_PROGRESS, "§7 second call IN_PROGRESS");
    EXPECT(now_ms() - t0 < 1000, "§7 at once");
    EXPECT_INT(other.queries, 0, "§7 the second call does nothing");
    EXPECT_INT(backup_log_reset_retry_records("busy", LOG_SUBCOMMAND_STOP), BACKUP_ERROR_IN_PROGRESS,
               "§7 reset of a running sequence");
    EXPECT_INT(backup_log_get_retry_records("busy", LOG_SUBCOMMAND_STOP, rec, 8, &count),
               BACKUP_SUCCESS, "§7 records of a running sequence readable");
    EXPECT_INT(count, 1, "§7 persisted before the wait");
    /* Another command of the same task is not blocked. */
    Task st = {.state = LOG_BACKUP_KERNEL_RUNNING};
    EXPECT_INT(backup_log_run_command("busy", LOG_SUBCOMMAND_PAUSE, &fast, tq, tx, &st), BACKUP_SUCCESS,
               "§7 other command of the task");
    uint64_t e0, r0;
    backup_plugin_get_error_stats(&e0, &r0);
    backup_plugin_cleanup();
    pthread_join(th, NULL);
    EXPECT_INT(r.rc, BACKUP_ERROR_CANCELLED, "§7 cleanup cancels");
    PASS("§7 run_command");
}

/* ---- §8 ------------------------------------------------------------------------------ */

typedef struct { int calls; int32_t rc; int fail_times; } Op;
static int32_t iop(void* u) {
    Op* o = (Op*)u;
    o->calls++;
    return o->calls <= o->fail_times ? o->rc : 0;
}

typedef struct { const char* key; const char* fp; int32_t rc; int sleep_ms; } Holder;
static int32_t slow_op(void* u) { usleep((useconds_t)((Holder*)u)->sleep_ms * 1000); return 0; }
static void* hold(void* arg) {
    Holder* h = (Holder*)arg;
    h->rc = backup_execute_idempotent(h->key, h->fp, strlen(h->fp), slow_op, h, NULL);
    return NULL;
}

static void section8(void) {
    char t[512];
    snprintf(t, sizeof t, "state_dir = \"%s/state8\"\nerror_retry_max = 2\n"
             "error_retry_interval = 0\n", g_dir);
    EXPECT_INT(init_text(t), BACKUP_SUCCESS, "§8 init");
    Op o = {0};
    bool replayed = true;
    EXPECT_INT(backup_execute_idempotent("k1", "fp", 2, iop, &o, &replayed), BACKUP_SUCCESS, "§8 first");
    EXPECT(!replayed, "§8 first: not replayed");
    EXPECT_INT(o.calls, 1, "§8 op ran");
    replayed = false;
    EXPECT_INT(backup_execute_idempotent("k1", "fp", 2, iop, &o, &replayed), BACKUP_SUCCESS, "§8 replay");
    EXPECT(replayed, "§8 replayed");
    EXPECT_INT(o.calls, 1, "§8 op not called on replay");
    EXPECT_INT(backup_execute_idempotent("k1", "fp", 2, iop, &o, NULL), BACKUP_SUCCESS,
               "§8 replayed_out NULL");
    EXPECT_INT(backup_execute_idempotent("k1", "other", 5, iop, &o, &replayed),
               BACKUP_ERROR_IDEMPOTENCY_CONFLICT, "§8 conflict");
    EXPECT_INT(o.calls, 1, "§8 conflict: op not called");
    /* NULL fingerprint with length 0. */
    EXPECT_INT(backup_execute_idempotent("k0", NULL, 0, iop, &o, NULL), BACKUP_SUCCESS,
               "§8 NULL fingerprint");
    EXPECT_INT(backup_execute_idempotent("k0", NULL, 0, iop, &o, &replayed), BACKUP_SUCCESS,
               "§8 NULL fingerprint replay");
    EXPECT(replayed, "§8 NULL fingerprint replayed");
    EXPECT_INT(backup_execute_idempotent("k0", NULL, 3, iop, &o, NULL), BACKUP_ERROR_INVALID_PARAM,
               "§8 NULL fingerprint with a length");
    /* Keys: 1..255 bytes, any content. */
    char k255[256], k256[257];
    memset(k255, 'a', 255); k255[255] = 0;
    memset(k256, 'a', 256); k256[256] = 0;
    o = (Op){0};
    EXPECT_INT(backup_execute_idempotent(k255, "f", 1, iop, &o, NULL), BACKUP_SUCCESS, "§8 255 bytes");
    EXPECT_INT(backup_execute_idempotent(k256, "f", 1, iop, &o, NULL), BACKUP_ERROR_INVALID_PARAM,
               "§8 256 bytes");
    EXPECT_HAS(backup_plugin_get_last_error(), "key", "§8 names the key");
    const char* odd[] = {"../../etc/passwd", "a/b", ".", "..", "with space", "\xff\xfe binary",
                         "new\nline"};
    for (size_t i = 0; i < sizeof odd / sizeof odd[0]; i++) {
        o = (Op){0};
        int32_t rc = backup_execute_idempotent(odd[i], "f", 1, iop, &o, NULL);
        EXPECTF(rc == BACKUP_SUCCESS && o.calls == 1, "§8 key \"%s\": rc %d calls %d", odd[i], rc,
                o.calls);
    }
    char stray[256];
    snprintf(stray, sizeof stray, "%s/etc/passwd", g_dir);
    EXPECT(access(stray, F_OK) != 0, "§8 key never a file name");
    /* A final failure releases the key; only successes are stored. */
    o = (Op){.rc = BACKUP_ERROR_PERMISSION_DENIED, .fail_times = 1};
    EXPECT_INT(backup_execute_idempotent("kf", "f", 1, iop, &o, &replayed),
               BACKUP_ERROR_PERMISSION_DENIED, "§8 failure returned");
    EXPECT_INT(backup_execute_idempotent("kf", "f", 1, iop, &o, &replayed), BACKUP_SUCCESS,
               "§8 a later call may try again");
    EXPECT(!replayed, "§8 not a replay of the failure");
    EXPECT_INT(o.calls, 2, "§8 op ran again");
    /* op through the retry policy. */
    o = (Op){.rc = BACKUP_ERROR_NETWORK, .fail_times = 2};
    EXPECT_INT(backup_execute_idempotent("kr", "f", 1, iop, &o, NULL), BACKUP_SUCCESS,
               "§8 op retried");
    EXPECT_INT(o.calls, 3, "§8 through the plugin's policy");
    o = (Op){.rc = BACKUP_ERROR_NETWORK, .fail_times = 100};
    EXPECT_INT(backup_execute_idempotent("kx", "f", 1, iop, &o, NULL), BACKUP_ERROR_RETRY_EXHAUSTED,
               "§8 op exhausted");
    /* Forget. */
    EXPECT_INT(backup_idempotency_forget("k1"), BACKUP_SUCCESS, "§8 forget");
    o = (Op){0};
    EXPECT_INT(backup_execute_idempotent("k1", "other", 5, iop, &o, &replayed), BACKUP_SUCCESS,
               "§8 after forget");
    EXPECT_INT(o.calls, 1, "§8 after forget op runs");
    EXPECT_INT(backup_idempotency_forget("never-seen"), BACKUP_SUCCESS, "§8 forget unknown");
    EXPECT_INT(backup_idempotency_forget(""), BACKUP_ERROR_INVALID_PARAM, "§8 forget empty");
    /* In progress; conflict before in progress. */
    Holder h = {.key = "held", .fp = "mine", .sleep_ms = 1500};
    pthread_t th;
    pthread_create(&th, NULL, hold, &h);
    usleep(300 * 1000);
    o = (Op){0};
    EXPECT_INT(backup_execute_idempotent("held", "mine", 4, iop, &o, &replayed),
               BACKUP_ERROR_IN_PROGRESS, "§8 claimed: IN_PROGRESS");
    EXPECT_INT(backup_execute_idempotent("held", "theirs", 6, iop, &o, &replayed),
               BACKUP_ERROR_IDEMPOTENCY_CONFLICT, "§8 mismatch before in progress");
    EXPECT_INT(o.calls, 0, "§8 op not called");
    pthread_join(th, NULL);
    EXPECT_INT(h.rc, BACKUP_SUCCESS, "§8 holder");
    uint64_t e, r;
    backup_plugin_get_error_stats(&e, &r);
    backup_plugin_cleanup();
    PASS("§8 idempotency");
}

/* ---- §10 ----------------------------------------------------------------------------- */

static void section10(void) {
    char dir[256], t[512];
    snprintf(dir, sizeof dir, "%s/diag", g_dir);
    snprintf(t, sizeof t, "log_path = \"%s\"\nlog_level = \"debug\"\nerror_retry_max = 1\n"
             "error_retry_interval = 0\n", dir);
    EXPECT_INT(init_text(t), BACKUP_SUCCESS, "§10 init");
    Script s = {.fail_times = 100, .code = BACKUP_ERROR_NETWORK};
    backup_plugin_execute_with_retry(scripted, &s);
    backup_plugin_cleanup();
    struct stat st;
    EXPECT(stat(dir, &st) == 0 && (st.st_mode & 07777) == 0750, "§10 dir 0750");
    EXPECT(count_prefix(dir, "backup_plugin.log.") == 1, "§10 backup_plugin.log.<date>");
    DIR* d = opendir(dir);
    struct dirent* e;
    while (d && (e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, "backup_plugin.log.", 18) != 0) continue;
        char path[512], buf[8192];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        EXPECT(stat(path, &st) == 0 && (st.st_mode & 07777) == 0640, "§10 file 0640");
        FILE* f = fopen(path, "r");
        size_t n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
        if (f) fclose(f);
        buf[n] = 0;
        EXPECT(n > 0, "§10 cleanup flushes the diagnostics (retries, give-ups)");
        time_t now = time(NULL);
        struct tm tm;
        gmtime_r(&now, &tm);
        char date[32];
        strftime(date, sizeof date, "%Y-%m-%d", &tm);
        EXPECT_HAS(e->d_name, date, "§10 daily file name has the date");
    }
    if (d) closedir(d);
    PASS("§10 diagnostics");
}


/* ---- deeper promises ------------------------------------------------------------------ */

#include <signal.h>
#include <sys/wait.h>

/* §2: the budget runs from the first failure, not from the call's start. */
typedef struct { int calls; int first_ms; } SlowFirst;
static int32_t slow_first(void* u) {
    SlowFirst* s = (SlowFirst*)u;
    if (s->calls++ == 0) usleep((useconds_t)s->first_ms * 1000);
    return BACKUP_ERROR_NETWORK;
}

static void deeper_budget(void) {
    SRetryContext ctx;
    backup_retry_context_init(&ctx, 0, 0);
    SRetryPolicy p = {.max_retry = 10, .initial_interval_ms = 100, .multiplier = 1.0,
                      .timeout_ms = 250};
    SlowFirst s = {.first_ms = 300};
    EXPECT_INT(backup_execute_with_retry_policy(&ctx, &p, slow_first, &s), BACKUP_ERROR_TIMEOUT,
               "§2 budget TIMEOUT");
    EXPECT_INT(s.calls, 3, "§2 budget from the first failure, not the call's start");
    /* Jitter: each wait at most the computed one, the budget still holds. */
    SRetryPolicy j = {.max_retry = 5, .initial_interval_ms = 50, .multiplier = 1.0, .jitter = true};
    Script sc = {.fail_times = 100, .code = BACKUP_ERROR_NETWORK};
    uint64_t t0 = now_ms();
    EXPECT_INT(backup_execute_with_retry_policy(&ctx, &j, scripted, &sc), BACKUP_ERROR_RETRY_EXHAUSTED,
               "§2 jitter exhausted");
    EXPECT(now_ms() - t0 < 450, "§2 full jitter: no wait longer than computed (5 x 50 ms)");
    EXPECT_INT(sc.calls, 6, "§2 jitter attempts");
    /* A policy zero-initialized but for what the host needs: multiplier 0 is no invalid
     * policy, and a budget that allows two 50 ms waits. */
    SRetryPolicy z = {.max_retry = 10, .initial_interval_ms = 50, .timeout_ms = 120};
    sc = (Script){.fail_times = 100, .code = BACKUP_ERROR_NETWORK};
    EXPECT_INT(backup_execute_with_retry_policy(&ctx, &z, scripted, &sc), BACKUP_ERROR_TIMEOUT,
               "§2 a zero-initialized policy: fixed interval");
    EXPECT_INT(sc.calls, 3, "§2 zero multiplier: waits of 50, 50 ms");
    backup_retry_context_destroy(&ctx);
    PASS("§2 budget from the first failure; jitter");
}

/* §4: a plugin-level call inside its first attempt when cleanup comes is cancelled at its
 * next wait, and never runs the rest of its schedule, even if init follows at once. */
static volatile int g_in_attempt = 0;
static int32_t slow_attempt(void* u) {
    int* calls = (int*)u;
    (*calls)++;
    g_in_attempt = 1;
    usleep(400 * 1000);
    return BACKUP_ERROR_NETWORK;
}
typedef struct { int calls; int32_t rc; } Inflight;
static void* inflight(void* arg) {
    Inflight* f = (Inflight*)arg;
    f->rc = backup_plugin_execute_with_retry(slow_attempt, &f->calls);
    return NULL;
}

static void deeper_cancel_inflight(void) {
    EXPECT_INT(init_text("error_retry_max = 3\nerror_retry_interval = \"10ms\"\n"), BACKUP_SUCCESS,
               "§4 init");
    Inflight f = {0};
    g_in_attempt = 0;
    pthread_t t;
    pthread_create(&t, NULL, inflight, &f);
    while (!g_in_attempt) usleep(1000);
    backup_plugin_cleanup();
    EXPECT_INT(init_text("error_retry_max = 3\nerror_retry_interval = \"10ms\"\n"), BACKUP_SUCCESS,
               "§4 init again at once");
    pthread_join(t, NULL);
    EXPECT_INT(f.rc, BACKUP_ERROR_CANCELLED, "§4 an attempt in flight is cancelled at its next wait");
    EXPECT_INT(f.calls, 1, "§4 never runs the rest of its schedule");
    uint64_t e, r;
    backup_plugin_get_error_stats(&e, &r);
    EXPECT(e == 0 && r == 0, "§4 the old call is not booked into the new instance");
    backup_plugin_cleanup();
    PASS("§4 in-flight call cancelled");
}

/* §1/§4: an operation's code outside the table, through the plugin. */
static int32_t returns_42(void* u) { (*(int*)u)++; return 42; }

static void deeper_outside_code(void) {
    char t[256];
    char dir[128];
    snprintf(dir, sizeof dir, "%s/out42", g_dir);
    snprintf(t, sizeof t, "error_retry_max = 3\nerror_retry_interval = 0\nerror_store_path = \"%s\"\n", dir);
    EXPECT_INT(init_text(t), BACKUP_SUCCESS, "§4 init");
    int calls = 0;
    EXPECT_INT(backup_plugin_execute_with_retry(returns_42, &calls), 42, "§1 plugin returns 42 as is");
    EXPECT_INT(calls, 1, "§1 42 not retried");
    uint64_t e, r;
    backup_plugin_get_error_stats(&e, &r);
    EXPECT_INT(e, 1, "§4 recorded");
    char buf[4096];
    read_log(dir, buf, sizeof buf, NULL);
    EXPECT_HAS(buf, "] Error 42: ", "§4/§6 recorded with that code in the error log");
    /* A failed write is logged with its code too. */
    char path[256];
    snprintf(path, sizeof path, "%s/missing/f", g_dir);
    EXPECT_INT(backup_plugin_write_file_with_retry(path, "x", 1), BACKUP_ERROR_RETRY_EXHAUSTED,
               "§4 write exhausted");
    read_log(dir, buf, sizeof buf, NULL);
    EXPECT_HAS(buf, "] Error -12: ", "§4/§6 an exhausted write logged with its code");
    backup_plugin_cleanup();
    PASS("§1 outside codes through the plugin");
}

/* §3/§4: a returned string stays valid whatever other threads do. */
static volatile int g_stop = 0;
static SBackupCoordinator* g_shared;
static void* churn(void* arg) {
    (void)arg;
    char msg[64];
    int i = 0;
    while (!g_stop) {
        snprintf(msg, sizeof msg, "churn %d", i++);
        backup_plugin_record_error(BACKUP_ERROR_NETWORK, msg);
        backup_plugin_clear_error();
        backup_record_error(g_shared, BACKUP_ERROR_NETWORK, msg);
        backup_clear_error(g_shared);
    }
    return NULL;
}

static void deeper_lifetimes(void) {
    EXPECT_INT(init_text("error_buffer_size = 4\n"), BACKUP_SUCCESS, "§4 init");
    SBackupCoordinatorConfig cfg = {.error_buffer_size = 4};
    g_shared = backup_coordinator_init(&cfg, NULL, NULL);
    backup_plugin_record_error(BACKUP_ERROR_FILE_IO, "mine-plugin");
    backup_record_error(g_shared, BACKUP_ERROR_FILE_IO, "mine-coordinator");
    const char* pl = backup_plugin_get_last_error();
    g_stop = 0;
    pthread_t t[2];
    pthread_create(&t[0], NULL, churn, NULL);
    pthread_create(&t[1], NULL, churn, NULL);
    usleep(100 * 1000);
    EXPECT_STR(pl, "mine-plugin", "§4 plugin last error valid until this thread's next call");
    g_stop = 1;
    pthread_join(t[0], NULL);
    pthread_join(t[1], NULL);
    backup_record_error(g_shared, BACKUP_ERROR_FILE_IO, "mine-coordinator");
    const char* co = backup_get_last_error(g_shared);
    g_stop = 0;
    pthread_create(&t[0], NULL, churn, NULL);
    pthread_create(&t[1], NULL, churn, NULL);
    usleep(100 * 1000);
    EXPECT_STR(co, "mine-coordinator", "§3 coordinator last error valid whatever others do");
    g_stop = 1;
    pthread_join(t[0], NULL);
    pthread_join(t[1], NULL);
    uint64_t e = 0;
    backup_get_error_stats(g_shared, &e, NULL);
    EXPECT(e > 2, "§3 concurrent records counted");
    backup_coordinator_destroy(g_shared);
    backup_plugin_cleanup();
    PASS("§3/§4 string lifetimes across threads");
}

/* §6: a line whose record call has returned survives the process being killed. */
static void deeper_kill(void) {
    char dir[128];
    snprintf(dir, sizeof dir, "%s/killed", g_dir);
    pid_t pid = fork();
    if (pid == 0) {
        char t[256];
        snprintf(t, sizeof t, "error_store_path = \"%s\"\n", dir);
        if (init_text(t) != 0) _exit(3);
        backup_plugin_record_error(BACKUP_ERROR_NETWORK, "last words");
        kill(getpid(), SIGKILL);
        _exit(4);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    EXPECT(WIFSIGNALED(status), "§6 child killed");
    char buf[4096];
    read_log(dir, buf, sizeof buf, NULL);
    EXPECT_HAS(buf, "Error -6: last words\n", "§6 the line survives SIGKILL");
    PASS("§6 kill");
}

/* §8: a dead owner's claim is taken over once its lease runs out, whatever the fingerprint;
 * a live owner renews past its lease. */
static int32_t die(void* u) { (void)u; kill(getpid(), SIGKILL); return 0; }
static int32_t sleep_2500(void* u) { (void)u; usleep(2500 * 1000); return 0; }
static void* hold_long(void* arg) {
    *(int32_t*)arg = backup_execute_idempotent("live", "a", 1, sleep_2500, NULL, NULL);
    return NULL;
}

static void deeper_leases(void) {
    char t[256];
    snprintf(t, sizeof t, "state_dir = \"%s/state_lease\"\nidempotency_lease = \"1s\"\n"
             "error_retry_max = 0\n", g_dir);
    pid_t pid = fork();
    if (pid == 0) {
        if (init_text(t) != 0) _exit(3);
        backup_execute_idempotent("dead", "fp-a", 4, die, NULL, NULL);
        _exit(4);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    EXPECT_INT(init_text(t), BACKUP_SUCCESS, "§8 init");
    Op o = {0};
    int32_t early = backup_execute_idempotent("dead", "fp-a", 4, iop, &o, NULL);
    EXPECT_INT(early, BACKUP_ERROR_IN_PROGRESS, "§8 claimed by a caller whose lease runs");
    EXPECT_INT(o.calls, 0, "§8 op not run on a live claim");
    if (early == BACKUP_ERROR_IN_PROGRESS) {
        EXPECT_INT(backup_execute_idempotent("dead", "fp-b", 4, iop, &o, NULL),
                   BACKUP_ERROR_IDEMPOTENCY_CONFLICT, "§8 claimed with another fingerprint: conflict");
        usleep(1300 * 1000);
        EXPECT_INT(backup_execute_idempotent("dead", "fp-b", 4, iop, &o, NULL), BACKUP_SUCCESS,
                   "§8 lease ran out: taken over whatever its fingerprint");
        EXPECT_INT(o.calls, 1, "§8 op runs on take-over");
    }
    int32_t rc = 1;
    pthread_t th;
    pthread_create(&th, NULL, hold_long, &rc);
    usleep(2000 * 1000);
    o = (Op){0};
    EXPECT_INT(backup_execute_idempotent("live", "a", 1, iop, &o, NULL), BACKUP_ERROR_IN_PROGRESS,
               "§8 a live owner renews its lease");
    pthread_join(th, NULL);
    EXPECT_INT(rc, BACKUP_SUCCESS, "§8 long op succeeds");
    backup_plugin_cleanup();
    /* Expired records are dropped (ttl). */
    snprintf(t, sizeof t, "state_dir = \"%s/state_ttl\"\nidempotency_ttl = 1\n", g_dir);
    EXPECT_INT(init_text(t), BACKUP_SUCCESS, "§8 init ttl");
    o = (Op){0};
    backup_execute_idempotent("ttl", "a", 1, iop, &o, NULL);
    usleep(1200 * 1000);
    bool replayed = true;
    EXPECT_INT(backup_execute_idempotent("ttl", "b", 1, iop, &o, &replayed), BACKUP_SUCCESS,
               "§8 expired: no conflict");
    EXPECT(!replayed && o.calls == 2, "§8 expired: op runs again");
    backup_plugin_cleanup();
    PASS("§8 leases");
}

/* §7: a restart continues the count, waits only the remainder, and a zero field defaults. */
static int32_t q_running2(void* u, ELogBackupKernelState* s, bool* t) {
    (void)u; *s = LOG_BACKUP_KERNEL_RUNNING; *t = false; return 0;
}
static int32_t exec_fail(void* u, ELogSubCommand c) { (void)c; (*(int*)u)++; return BACKUP_ERROR_NETWORK; }

static void deeper_restart(void) {
    char t[256];
    snprintf(t, sizeof t, "state_dir = \"%s/state_restart\"\nidempotency_lease = \"1s\"\n", g_dir);
    const SLogBackupRetryPolicy p = {.max_retry_times = 3, .min_retry_duration_ms = 2000,
                                     .max_retry_duration_ms = 2000, .retry_timeout_ms = 60000};
    int pfd[2];
    CHECK(pipe(pfd) == 0);
    pid_t pid = fork();
    if (pid == 0) {
        if (init_text(t) != 0) _exit(3);
        int n = 0;
        backup_log_run_command("rt", LOG_SUBCOMMAND_STOP, &p, q_running2, exec_fail, &n);
        _exit(4);
    }
    /* This process shares the state directory: it sees the child's record once the child
     * is in its first 2 s wait, and kills it 700 ms into that wait. */
    close(pfd[0]);
    close(pfd[1]);
    EXPECT_INT(init_text(t), BACKUP_SUCCESS, "§7 init");
    SLogBackupRetryRecord rec[8];
    uint32_t count = 0;
    for (int i = 0; i < 500 && count == 0; i++) {
        backup_log_get_retry_records("rt", LOG_SUBCOMMAND_STOP, rec, 8, &count);
        if (count == 0) usleep(10 * 1000);
    }
    if (count >= 1) {
        while (unix_ms() < rec[0].detect_failed_at_ms + 700) usleep(10 * 1000);
    }
    kill(pid, SIGKILL);
    int status;
    waitpid(pid, &status, 0);
    EXPECT_INT(backup_log_get_retry_records("rt", LOG_SUBCOMMAND_STOP, rec, 8, &count), BACKUP_SUCCESS,
               "§7 records after a crash");
    EXPECT_INT(count, 1, "§7 the record persisted before the wait");
    uint64_t expected = count ? rec[0].expected_retry_at_ms : 0;
    int n = 0;
    uint64_t t0 = unix_ms();
    int32_t rc = BACKUP_ERROR_IN_PROGRESS;
    for (int i = 0; i < 30 && rc == BACKUP_ERROR_IN_PROGRESS; i++) {
        rc = backup_log_run_command("rt", LOG_SUBCOMMAND_STOP, &p, q_running2, exec_fail, &n);
        if (rc == BACKUP_ERROR_IN_PROGRESS) usleep(100 * 1000);
    }
    EXPECT_INT(rc, BACKUP_ERROR_RETRY_EXHAUSTED, "§7 resumed sequence exhausted");
    EXPECT_INT(n, 3, "§7 same count: 3 more attempts (the first was the dead process's)");
    (void)t0;
    EXPECT_INT(backup_log_get_retry_records("rt", LOG_SUBCOMMAND_STOP, rec, 8, &count), BACKUP_SUCCESS,
               "§7 records");
    /* Retry 1 ran when the dead process's wait was due, not a whole new wait later (the
     * new call started at least 700 ms into the 2 s wait, so a new wait would end 2 s
     * after that, well past the due time). */
    if (count >= 1) {
        EXPECT_INT(rec[0].expected_retry_at_ms, expected, "§7 the begun wait's due time kept");
        EXPECT(rec[0].real_retry_at_ms >= expected && rec[0].real_retry_at_ms < expected + 1200,
               "§7 only the remainder of the begun wait");
    }
    EXPECT_INT(count, 3, "§7 one sequence of max_retry_times records");
    for (uint32_t i = 0; i < count && i < 8; i++) EXPECT_INT(rec[i].retry_num, i + 1, "§7 retry_num");
    /* A zero field takes its default (max_retry_times 5). */
    const SLogBackupRetryPolicy z = {.max_retry_times = 0, .min_retry_duration_ms = 1,
                                     .max_retry_duration_ms = 1, .retry_timeout_ms = 0};
    n = 0;
    EXPECT_INT(backup_log_run_command("z", LOG_SUBCOMMAND_STOP, &z, q_running2, exec_fail, &n),
               BACKUP_ERROR_RETRY_EXHAUSTED, "§7 zero fields");
    EXPECT_INT(n, 6, "§7 max_retry_times 0 takes its default 5");
    /* Record fields: waits min << (n-1), capped. */
    const SLogBackupRetryPolicy g = {.max_retry_times = 4, .min_retry_duration_ms = 20,
                                     .max_retry_duration_ms = 50, .retry_timeout_ms = 60000};
    n = 0;
    backup_log_run_command("g", LOG_SUBCOMMAND_STOP, &g, q_running2, exec_fail, &n);
    EXPECT_INT(backup_log_get_retry_records("g", LOG_SUBCOMMAND_STOP, rec, 8, &count), BACKUP_SUCCESS,
               "§7 records g");
    const uint64_t waits[4] = {20, 40, 50, 50};
    for (uint32_t i = 0; i < count && i < 4; i++) {
        int64_t w = (int64_t)(rec[i].expected_retry_at_ms - rec[i].detect_failed_at_ms);
        EXPECTF(w >= (int64_t)waits[i] && w <= (int64_t)waits[i] + 15 &&
                    rec[i].real_retry_at_ms >= rec[i].expected_retry_at_ms &&
                    rec[i].reason_code == BACKUP_ERROR_NETWORK,
                "§7 record %u: wait %lld (expected %llu), real %llu expected %llu, reason %d", i,
                (long long)w, (unsigned long long)waits[i],
                (unsigned long long)rec[i].real_retry_at_ms,
                (unsigned long long)rec[i].expected_retry_at_ms, rec[i].reason_code);
    }
    backup_plugin_cleanup();
    PASS("§7 restart and policy");
}

/* §3: the library knows which coordinators it created, also when an address is reused. */
static void deeper_registry(void) {
    for (int i = 0; i < 20; i++) {
        SBackupCoordinatorConfig cfg = {.error_retry_max = 1, .backup_path = "copied"};
        SBackupCoordinator* c = backup_coordinator_init(&cfg, NULL, NULL);
        backup_coordinator_destroy(c);
        SBackupCoordinator* m = malloc(sizeof *m);
        memset(m, 0, sizeof *m);
        m->config.backup_path = "literal";
        m->config.encryption_key = "literal";
        m->config.error_store_path = "literal";
        backup_retry_context_init(&m->retry_context, 0, 0);
        backup_record_error(m, BACKUP_ERROR_NETWORK, NULL);
        backup_coordinator_destroy(m); /* must not free the literals (ASan would abort) */
    }
    /* No path or logging off: no file. */
    char dir[128];
    snprintf(dir, sizeof dir, "%s/nolog", g_dir);
    SBackupCoordinatorConfig off = {.error_store_path = dir, .enable_error_logging = false};
    SBackupCoordinator* c = backup_coordinator_init(&off, NULL, NULL);
    backup_record_error(c, BACKUP_ERROR_NETWORK, NULL);
    backup_coordinator_destroy(c);
    EXPECT(count_prefix(dir, "backup_error_") <= 0, "§3 logging off: no log line");
    PASS("§3 registry");
}

/* §6: names unique, a taken name moves to the next millisecond; 0750/0640 whatever umask. */
static void deeper_names(void) {
    char dir[128], path[512], t[256];
    snprintf(dir, sizeof dir, "%s/names", g_dir);
    mkdir(dir, 0750);
    uint64_t now = unix_ms();
    for (uint64_t ms = now; ms < now + 400; ms++) {
        snprintf(path, sizeof path, "%s/backup_error_%llu.log", dir, (unsigned long long)ms);
        FILE* f = fopen(path, "w");
        if (f) { fputs("foreign\n", f); fclose(f); }
    }
    snprintf(t, sizeof t, "error_store_path = \"%s\"\nerror_log_rotation_count = 100000\n", dir);
    EXPECT_INT(init_text(t), BACKUP_SUCCESS, "§6 init");
    backup_plugin_record_error(BACKUP_ERROR_NETWORK, "ours");
    backup_plugin_cleanup();
    EXPECT_INT(count_prefix(dir, "backup_error_"), 401, "§6 a new file, no name reused");
    int foreign_touched = 0;
    for (uint64_t ms = now; ms < now + 400; ms++) {
        snprintf(path, sizeof path, "%s/backup_error_%llu.log", dir, (unsigned long long)ms);
        struct stat st;
        if (stat(path, &st) != 0 || st.st_size != 8) foreign_touched++;
    }
    EXPECT_INT(foreign_touched, 0, "§6 files created exclusively");

    snprintf(dir, sizeof dir, "%s/umask/deep", g_dir);
    mode_t old = umask(077);
    SBackupCoordinatorConfig cfg = {.error_store_path = dir, .enable_error_logging = true};
    SBackupCoordinator* c = backup_coordinator_init(&cfg, NULL, NULL);
    backup_record_error(c, BACKUP_ERROR_NETWORK, NULL);
    backup_coordinator_destroy(c);
    umask(old);
    struct stat st;
    EXPECT(stat(dir, &st) == 0 && (st.st_mode & 07777) == 0750, "§6 directory 0750 under umask 077");
    char name[256] = "", buf[512];
    read_log(dir, buf, sizeof buf, name);
    snprintf(path, sizeof path, "%s/%s", dir, name);
    EXPECT(stat(path, &st) == 0 && (st.st_mode & 07777) == 0640, "§6 file 0640 under umask 077");
    PASS("§6 names and modes");
}

/* §6: writers sharing a directory: the newest line of every live writer stays on disk. */
static int line_on_disk(const char* dir, const char* line) {
    DIR* d = opendir(dir);
    if (!d) return 0;
    struct dirent* e;
    int found = 0;
    while (!found && (e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.') continue;
        char path[512], buf[65536];
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        FILE* f = fopen(path, "r");
        size_t n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
        if (f) fclose(f);
        buf[n] = 0;
        if (strstr(buf, line)) found = 1;
    }
    closedir(d);
    return found;
}

static void deeper_shared_dir(void) {
    char dir[128], t[256];
    snprintf(dir, sizeof dir, "%s/shared", g_dir);
    snprintf(t, sizeof t, "error_store_path = \"%s\"\nerror_log_rotation_count = 1\n"
             "error_log_rotation_size = \"1KB\"\n", dir);
    EXPECT_INT(init_text(t), BACKUP_SUCCESS, "§6 init");
    SBackupCoordinatorConfig cfg = {.error_store_path = dir, .enable_error_logging = true};
    SBackupCoordinator* c = backup_coordinator_init(&cfg, NULL, NULL);
    char msg[64];
    int bad = 0;
    for (int i = 0; i < 40; i++) {
        snprintf(msg, sizeof msg, "plugin line %d xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx", i);
        backup_plugin_record_error(BACKUP_ERROR_NETWORK, msg);
        char cmsg[64];
        snprintf(cmsg, sizeof cmsg, "coord line %d", i);
        backup_record_error(c, BACKUP_ERROR_FILE_IO, cmsg);
        if (!line_on_disk(dir, msg) || !line_on_disk(dir, cmsg)) bad++;
    }
    EXPECT_INT(bad, 0, "§6 the newest line of every live writer is on disk");
    backup_coordinator_destroy(c);
    backup_plugin_cleanup();
    PASS("§6 shared directory");
}

/* §7: INVALID_STATE finishes an unfinished sequence; a finished one is replaced by a new one. */
static void* run_pause_slow(void* arg) {
    /* Short enough that the resumed call below waits out the remainder quickly. */
    static const SLogBackupRetryPolicy slow = {.max_retry_times = 3, .min_retry_duration_ms = 1500,
                                               .max_retry_duration_ms = 1500};
    Runner* r = (Runner*)arg;
    r->rc = backup_log_run_command("seq", LOG_SUBCOMMAND_PAUSE, &slow, tq, tx, &r->task);
    return NULL;
}

static void deeper_sequences(void) {
    char t[256];
    snprintf(t, sizeof t, "state_dir = \"%s/state_seq\"\n", g_dir);
    EXPECT_INT(init_text(t), BACKUP_SUCCESS, "§7 init");
    Runner r = {.task = {.state = LOG_BACKUP_KERNEL_RUNNING, .exec_fail = BACKUP_ERROR_NETWORK,
                         .exec_fails = 100}};
    pthread_t th;
    pthread_create(&th, NULL, run_pause_slow, &r);
    usleep(700 * 1000);
    backup_plugin_cleanup();
    pthread_join(th, NULL);
    EXPECT_INT(r.rc, BACKUP_ERROR_CANCELLED, "§7 cancelled");
    EXPECT_INT(init_text(t), BACKUP_SUCCESS, "§7 init again");
    SLogBackupRetryRecord rec[8];
    uint32_t count = 0;
    backup_log_get_retry_records("seq", LOG_SUBCOMMAND_PAUSE, rec, 8, &count);
    EXPECT_INT(count, 1, "§7 CANCELLED leaves the sequence (its record)");
    const SLogBackupRetryPolicy fast = {.max_retry_times = 2, .min_retry_duration_ms = 1,
                                        .max_retry_duration_ms = 1, .retry_timeout_ms = 60000};
    Task gone = {.state = LOG_BACKUP_KERNEL_NOT_EXIST};
    uint64_t due = count >= 1 ? rec[0].expected_retry_at_ms : 0;
    EXPECT_INT(backup_log_run_command("seq", LOG_SUBCOMMAND_PAUSE, &fast, tq, tx, &gone),
               BACKUP_ERROR_INVALID_STATE, "§7 resumed sequence ends INVALID_STATE");
    /* The resumed call waited out the begun wait (due time), not a new 1.5 s one, which
     * would end at least 700 ms past it. */
    uint64_t returned = unix_ms();
    EXPECT(returned >= due && returned < due + 500, "§7 the resumed call waits the remainder of the begun wait");
    backup_log_get_retry_records("seq", LOG_SUBCOMMAND_PAUSE, rec, 8, &count);
    EXPECT(count >= 1, "§7 records stay readable after INVALID_STATE");
    Task fail = {.state = LOG_BACKUP_KERNEL_RUNNING, .exec_fail = BACKUP_ERROR_NETWORK, .exec_fails = 100};
    EXPECT_INT(backup_log_run_command("seq", LOG_SUBCOMMAND_PAUSE, &fast, tq, tx, &fail),
               BACKUP_ERROR_RETRY_EXHAUSTED, "§7 a new sequence after a finished one");
    EXPECT_INT(fail.executes, 3, "§7 the new sequence has its own count");
    backup_log_get_retry_records("seq", LOG_SUBCOMMAND_PAUSE, rec, 8, &count);
    EXPECT_INT(count, 2, "§7 only the new sequence's records");
    if (count >= 1) EXPECT_INT(rec[0].retry_num, 1, "§7 new sequence starts at 1");
    Task again = {.state = LOG_BACKUP_KERNEL_RUNNING, .exec_fail = BACKUP_ERROR_NETWORK, .exec_fails = 100};
    backup_log_run_command("seq", LOG_SUBCOMMAND_PAUSE, &fast, tq, tx, &again);
    EXPECT_INT(again.executes, 3, "§7 exhausted sequence is finished: next call starts anew");
    backup_plugin_cleanup();
    PASS("§7 sequences");
}

/* §4: the calls of the plugin that need init; cancel of a direct execute; success keeps the
 * last error. */
static void* direct_exec(void* arg) {
    SRetryContext* ctx = (SRetryContext*)arg;
    Script s = {.fail_times = 100, .code = BACKUP_ERROR_NETWORK};
    ctx->current_retry = (uint32_t)backup_execute_with_retry(ctx, scripted, &s);
    return NULL;
}

static int32_t once_claim(void* u) { __atomic_add_fetch((int*)u, 1, __ATOMIC_SEQ_CST); usleep(50000); return 0; }
typedef struct { int* runs; int32_t rc; } Claimer;
static void* claimer(void* arg) {
    Claimer* c = (Claimer*)arg;
    c->rc = backup_execute_idempotent("race", "same", 4, once_claim, c->runs, NULL);
    return NULL;
}

static void deeper_misc(void) {
    SBackupErrorRecord hist[2];
    uint32_t count;
    char buf[64];
    size_t len;
    EXPECT_INT(backup_plugin_get_error_history(hist, 2, &count), BACKUP_ERROR_NOT_INITIALIZED,
               "§4 history before init");
    EXPECT_INT(backup_plugin_get_metrics(buf, sizeof buf, &len), BACKUP_ERROR_NOT_INITIALIZED,
               "§4 metrics before init");
    EXPECT(backup_plugin_get_error_log_path() == NULL, "§4 no log path before init");

    SRetryContext ctx;
    backup_retry_context_init(&ctx, 3, 30);
    pthread_t t;
    pthread_create(&t, NULL, direct_exec, &ctx);
    usleep(200 * 1000);
    backup_plugin_cleanup();
    pthread_join(t, NULL);
    EXPECT_INT((int32_t)ctx.current_retry, BACKUP_ERROR_CANCELLED, "§2 a direct execute's wait is cancellable");
    backup_retry_context_destroy(&ctx);

    EXPECT_INT(init_text("error_retry_max = 1\nerror_retry_interval = 0\n"), BACKUP_SUCCESS, "§4 init");
    backup_plugin_record_error(BACKUP_ERROR_NETWORK, "kept");
    EXPECT_INT(backup_plugin_execute_with_retry(ok_op, NULL), BACKUP_SUCCESS, "§4 success");
    EXPECT_STR(backup_plugin_get_last_error(), "kept", "§4 a success does not change the last error");
    backup_plugin_cleanup();

    char tt[256];
    snprintf(tt, sizeof tt, "state_dir = \"%s/state_race\"\n", g_dir);
    EXPECT_INT(init_text(tt), BACKUP_SUCCESS, "§8 init");
    int runs = 0;
    Claimer cl[8];
    pthread_t th[8];
    for (int i = 0; i < 8; i++) { cl[i] = (Claimer){.runs = &runs}; pthread_create(&th[i], NULL, claimer, &cl[i]); }
    int ok = 0, busy = 0;
    for (int i = 0; i < 8; i++) {
        pthread_join(th[i], NULL);
        if (cl[i].rc == BACKUP_SUCCESS) ok++;
        if (cl[i].rc == BACKUP_ERROR_IN_PROGRESS) busy++;
    }
    EXPECT_INT(runs, 1, "§8 claiming is atomic across threads");
    EXPECT_INT(ok + busy, 8, "§8 the others: IN_PROGRESS or a replay");
    backup_plugin_cleanup();
    PASS("§4 misc");
}

/* §4: what the plugin-level operations book; §8: a completion survives SIGKILL after return. */
static int32_t exec_fail_net(void* u, ELogSubCommand c) { (void)u; (void)c; return BACKUP_ERROR_NETWORK; }

static void deeper_booking(void) {
    char t[256];
    snprintf(t, sizeof t, "state_dir = \"%s/state_book\"\nerror_retry_max = 2\n"
             "error_retry_interval = 0\n", g_dir);
    pid_t pid = fork();
    if (pid == 0) {
        if (init_text(t) != 0) _exit(3);
        if (backup_execute_idempotent("durable", "fp", 2, ok_op, NULL, NULL) != 0) _exit(5);
        kill(getpid(), SIGKILL);
        _exit(4);
    }
    int status;
    waitpid(pid, &status, 0);
    EXPECT_INT(init_text(t), BACKUP_SUCCESS, "§8 init");
    Op o = {0};
    bool replayed = false;
    EXPECT_INT(backup_execute_idempotent("durable", "fp", 2, iop, &o, &replayed), BACKUP_SUCCESS,
               "§8 replay after the owner was killed");
    EXPECT(replayed && o.calls == 0, "§8 success recorded durably before the call returned");
    uint64_t e0, r0, e1, r1;
    backup_plugin_get_error_stats(&e0, &r0);
    EXPECT(e0 == 0 && r0 == 0, "§8 a replay books nothing");
    EXPECT_INT(backup_execute_idempotent("durable", "other", 5, iop, &o, NULL),
               BACKUP_ERROR_IDEMPOTENCY_CONFLICT, "§8 conflict");
    backup_plugin_get_error_stats(&e1, &r1);
    EXPECT_INT(e1 - e0, 1, "§4 a conflict is one error of the plugin");
    o = (Op){.rc = BACKUP_ERROR_NETWORK, .fail_times = 1};
    backup_execute_idempotent("retried", "fp", 2, iop, &o, NULL);
    backup_plugin_get_error_stats(&e0, &r0);
    EXPECT_INT(r0 - r1, 1, "§4 retries of an idempotent op count");
    EXPECT_INT(e0, e1, "§4 a retried success is no error");
    SLogBackupRetryPolicy fast = {.max_retry_times = 3, .min_retry_duration_ms = 1,
                                  .max_retry_duration_ms = 1, .retry_timeout_ms = 60000};
    EXPECT_INT(backup_log_run_command("book", LOG_SUBCOMMAND_STOP, &fast, q_running2, exec_fail_net, NULL),
               BACKUP_ERROR_RETRY_EXHAUSTED, "§7 exhausted");
    backup_plugin_get_error_stats(&e1, &r1);
    EXPECT_INT(r1 - r0, 3, "§4 retries of a log command count");
    EXPECT_INT(e1 - e0, 1, "§4 one error per log command call");
    SLogBackupRetryRecord rec[1];
    uint32_t count;
    EXPECT_INT(backup_log_get_retry_records("book", LOG_SUBCOMMAND_STOP, rec, 1, &count), BACKUP_SUCCESS,
               "§7 records");
    EXPECT_INT(backup_log_get_retry_records("book", LOG_SUBCOMMAND_STOP, rec, 1, NULL),
               BACKUP_ERROR_INVALID_PARAM, "§7 NULL count_out");
    backup_plugin_get_error_stats(&e0, &r0);
    EXPECT_INT(e0, e1, "§4 get_retry_records is not a plugin-level operation: not counted");
    backup_plugin_cleanup();
    PASS("§4 booking");
}

/* §6: one file takes many lines; the count applies at once over the whole directory;
 * a caller-allocated coordinator logs too. */
static void deeper_files(void) {
    char dir[128], t[256], path[256];
    snprintf(dir, sizeof dir, "%s/many", g_dir);
    snprintf(t, sizeof t, "error_store_path = \"%s\"\n", dir);
    EXPECT_INT(init_text(t), BACKUP_SUCCESS, "§6 init");
    for (int i = 0; i < 3; i++) backup_plugin_record_error(BACKUP_ERROR_NETWORK, "line");
    backup_plugin_cleanup();
    EXPECT_INT(count_prefix(dir, "backup_error_"), 1, "§6 one file takes many lines");
    char buf[1024];
    read_log(dir, buf, sizeof buf, NULL);
    int lines = 0;
    for (char* q = buf; *q; q++) lines += *q == '\n';
    EXPECT_INT(lines, 3, "§6 three lines");

    snprintf(dir, sizeof dir, "%s/count_at_once", g_dir);
    mkdir(dir, 0750);
    for (int i = 0; i < 5; i++) {
        snprintf(path, sizeof path, "%s/backup_error_%d.log", dir, 100 + i);
        FILE* f = fopen(path, "w");
        if (f) fclose(f);
    }
    snprintf(t, sizeof t, "error_store_path = \"%s\"\nerror_log_rotation_count = 2\n", dir);
    EXPECT_INT(init_text(t), BACKUP_SUCCESS, "§6 init count");
    backup_plugin_record_error(BACKUP_ERROR_NETWORK, "x");
    EXPECT(count_prefix(dir, "backup_error_") <= 2, "§6 files beyond the count deleted");
    backup_plugin_cleanup();

    char mdir[128];
    snprintf(mdir, sizeof mdir, "%s/malloc_log", g_dir);
    SBackupCoordinator* m = calloc(1, sizeof *m);
    m->config.error_store_path = mdir;
    m->config.enable_error_logging = true;
    backup_retry_context_init(&m->retry_context, 0, 0);
    backup_record_error(m, BACKUP_ERROR_TIMEOUT, "from malloc'd");
    backup_coordinator_destroy(m);
    read_log(mdir, buf, sizeof buf, NULL);
    EXPECT_HAS(buf, "Error -7: from malloc'd\n", "§3 a caller-allocated coordinator logs");
    PASS("§6 files");
}

int main(void) {
    snprintf(g_dir, sizeof g_dir, "/tmp/backup_abi_XXXXXX");
    CHECK(mkdtemp(g_dir) != NULL);
    section1();
    section2();
    section3();
    section4_before_init();
    section2_cancel();
    section4_lifecycle();
    section4_cancel();
    section5();
    section5_effect();
    section6();
    section7_table();
    section7_run();
    section8();
    section10();
    deeper_budget();
    deeper_cancel_inflight();
    deeper_outside_code();
    deeper_lifetimes();
    deeper_kill();
    deeper_leases();
    deeper_restart();
    deeper_registry();
    deeper_names();
    deeper_shared_dir();
    deeper_sequences();
    deeper_misc();
    deeper_booking();
    deeper_files();
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    CHECK(system(cmd) == 0);
    return check_report("test_abi_conformance");
}
