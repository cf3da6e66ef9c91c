/* Idempotency keys through the C ABI: run once, replay, conflict, in progress, release on
 * failure, forget, bad arguments, 8 threads racing over the same 1000 keys, and fenced
 * operations (docs/C_API.md §8.1): tokens that grow per key, the same token on every
 * attempt, check_claim, a destination that refuses a stale token. */
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <unistd.h>

#include "backup_coordinator.h"
#include "check.h"

enum { THREADS = 8, KEYS = 1000 };

static atomic_int g_runs[KEYS];

typedef struct {
    int key;
    int32_t fail_with;
    int fail_times;
    int calls;
} Op;

static int32_t op(void* user_data) {
    Op* o = (Op*)user_data;
    o->calls++;
    if (o->calls <= o->fail_times) return o->fail_with;
    atomic_fetch_add(&g_runs[o->key], 1);
    return BACKUP_SUCCESS;
}

static int32_t must_not_run(void* user_data) {
    (void)user_data;
    fprintf(stderr, "an operation ran that must not\n");
    exit(1);
}

static void test_arguments(void) {
    Op o = {0};
    char long_key[300];
    memset(long_key, 'k', sizeof long_key - 1);
    long_key[sizeof long_key - 1] = '\0';
    CHECK_EQ_INT(backup_execute_idempotent(NULL, NULL, 0, op, &o, NULL), BACKUP_ERROR_INVALID_PARAM);
    CHECK_STR_CONTAINS(backup_plugin_get_last_error(), "key");
    CHECK_EQ_INT(backup_execute_idempotent("", NULL, 0, op, &o, NULL), BACKUP_ERROR_INVALID_PARAM);
    CHECK_EQ_INT(backup_execute_idempotent(long_key, NULL, 0, op, &o, NULL), BACKUP_ERROR_INVALID_PARAM);
    CHECK_STR_CONTAINS(backup_plugin_get_last_error(), "299");
    long_key[BACKUP_IDEMPOTENCY_KEY_MAX] = '\0';
    CHECK_EQ_INT(backup_idempotency_forget(long_key), BACKUP_SUCCESS);
    CHECK_EQ_INT(backup_execute_idempotent("k", NULL, 5, op, &o, NULL), BACKUP_ERROR_INVALID_PARAM);
    CHECK_STR_CONTAINS(backup_plugin_get_last_error(), "fingerprint");
    CHECK_EQ_INT(backup_execute_idempotent("k", NULL, 0, NULL, &o, NULL), BACKUP_ERROR_INVALID_PARAM);
    CHECK_EQ_INT(backup_idempotency_forget(NULL), BACKUP_ERROR_INVALID_PARAM);
    CHECK_EQ_INT(o.calls, 0);
    PASS("bad arguments are INVALID_PARAM and run nothing");
}

static void test_once_replay_conflict(void) {
    Op o = {.key = 0};
    bool replayed = true;
    const char fp[] = "payload-1";
    CHECK_EQ_INT(backup_execute_idempotent("job/1", fp, sizeof fp, op, &o, &replayed), BACKUP_SUCCESS);
    CHECK(!replayed);
    CHECK_EQ_INT(o.calls, 1);
    CHECK_EQ_INT(backup_execute_idempotent("job/1", fp, sizeof fp, must_not_run, NULL, &replayed), BACKUP_SUCCESS);
    CHECK(replayed);
    CHECK_EQ_INT(backup_execute_idempotent("job/1", fp, sizeof fp, must_not_run, NULL, NULL), BACKUP_SUCCESS);
    CHECK_EQ_INT(backup_execute_idempotent("job/1", "other", 5, must_not_run, NULL, &replayed), BACKUP_ERROR_IDEMPOTENCY_CONFLICT);
    CHECK(!replayed);
    CHECK_STR_CONTAINS(backup_plugin_get_last_error(), "job/1");
    /* No fingerprint at all is a fingerprint too. */
    CHECK_EQ_INT(backup_execute_idempotent("job/2", NULL, 0, op, &o, NULL), BACKUP_SUCCESS);
    CHECK_EQ_INT(backup_execute_idempotent("job/2", NULL, 0, must_not_run, NULL, &replayed), BACKUP_SUCCESS);
    CHECK(replayed);
    CHECK_EQ_INT(atomic_load(&g_runs[0]), 2);
    PASS("runs once, replays, conflicts on another fingerprint");
}

static void test_failure_releases(void) {
    /* Retryable: retried by the plugin policy (error_retry_max = 2), then released. */
    Op o = {.key = 1, .fail_with = BACKUP_ERROR_NETWORK, .fail_times = 100};
    CHECK_EQ_INT(backup_execute_idempotent("flaky", NULL, 0, op, &o, NULL), BACKUP_ERROR_RETRY_EXHAUSTED);
    CHECK_EQ_INT(o.calls, 3);
    Op permanent = {.key = 1, .fail_with = BACKUP_ERROR_PERMISSION_DENIED, .fail_times = 1};
    CHECK_EQ_INT(backup_execute_idempotent("flaky", NULL, 0, op, &permanent, NULL), BACKUP_ERROR_PERMISSION_DENIED);
    CHECK_EQ_INT(permanent.calls, 1);
    Op recovers = {.key = 1, .fail_with = BACKUP_ERROR_TIMEOUT, .fail_times = 1};
    CHECK_EQ_INT(backup_execute_idempotent("flaky", NULL, 0, op, &recovers, NULL), BACKUP_SUCCESS);
    CHECK_EQ_INT(recovers.calls, 2);
    CHECK_EQ_INT(atomic_load(&g_runs[1]), 1);
    /* Forget: the key may run again. */
    CHECK_EQ_INT(backup_idempotency_forget("flaky"), BACKUP_SUCCESS);
    Op again = {.key = 1};
    CHECK_EQ_INT(backup_execute_idempotent("flaky", NULL, 0, op, &again, NULL), BACKUP_SUCCESS);
    CHECK_EQ_INT(atomic_load(&g_runs[1]), 2);
    PASS("a failed operation releases its key; forget lets it run again");
}

/* An operation that holds its key until told to finish. */
static atomic_int g_holding, g_release;

static int32_t slow_op(void* user_data) {
    (void)user_data;
    atomic_store(&g_holding, 1);
    while (!atomic_load(&g_release)) usleep(1000);
    return BACKUP_SUCCESS;
}

static void* run_slow(void* arg) {
    (void)arg;
    int32_t* rc = malloc(sizeof *rc);
    *rc = backup_execute_idempotent("slow", "fp", 2, slow_op, NULL, NULL);
    return rc;
}

static void test_in_progress(void) {
    pthread_t owner;
    CHECK(pthread_create(&owner, NULL, run_slow, NULL) == 0);
    while (!atomic_load(&g_holding)) usleep(1000);
    CHECK_EQ_INT(backup_execute_idempotent("slow", "fp", 2, must_not_run, NULL, NULL), BACKUP_ERROR_IN_PROGRESS);
    CHECK_STR_CONTAINS(backup_plugin_get_last_error(), "in progress");
    /* A different payload is a conflict, reported before "in progress". */
    CHECK_EQ_INT(backup_execute_idempotent("slow", "xx", 2, must_not_run, NULL, NULL), BACKUP_ERROR_IDEMPOTENCY_CONFLICT);
    CHECK_EQ_INT(backup_idempotency_forget("slow"), BACKUP_ERROR_IN_PROGRESS);
    atomic_store(&g_release, 1);
    void* rc;
    CHECK(pthread_join(owner, &rc) == 0);
    CHECK_EQ_INT(*(int32_t*)rc, BACKUP_SUCCESS);
    free(rc);
    bool replayed = false;
    CHECK_EQ_INT(backup_execute_idempotent("slow", "fp", 2, must_not_run, NULL, &replayed), BACKUP_SUCCESS);
    CHECK(replayed);
    PASS("a running key is IN_PROGRESS for others; conflict comes first");
}

typedef struct {
    int thread;
    int ran, replayed, busy;
} Racer;

static void* race(void* arg) {
    Racer* r = (Racer*)arg;
    /* Even threads walk the keys in step, racing for each one; odd ones start elsewhere. */
    int start = r->thread % 2 == 0 ? 0 : r->thread * (KEYS / THREADS);
    for (int i = 0; i < KEYS; i++) {
        int k = (i + start) % KEYS;
        char key[32], fp[32];
        snprintf(key, sizeof key, "race-%d", k);
        int fp_len = snprintf(fp, sizeof fp, "payload-%d", k);
        Op o = {.key = k};
        for (;;) {
            bool replayed = false;
            int32_t rc = backup_execute_idempotent(key, fp, (size_t)fp_len, op, &o, &replayed);
            if (rc == BACKUP_ERROR_IN_PROGRESS) {
                r->busy++;
                sched_yield();
                continue;
            }
            if (rc != BACKUP_SUCCESS) {
                fprintf(stderr, "key %s: %d %s\n", key, rc, backup_plugin_get_last_error());
                exit(1);
            }
            if (replayed) r->replayed++;
            else r->ran++;
            break;
        }
    }
    return NULL;
}

static void test_threads_race_over_the_same_keys(void) {
    for (int k = 0; k < KEYS; k++) atomic_store(&g_runs[k], 0);
    pthread_t threads[THREADS];
    Racer racers[THREADS];
    for (int t = 0; t < THREADS; t++) {
        racers[t] = (Racer){.thread = t};
        CHECK(pthread_create(&threads[t], NULL, race, &racers[t]) == 0);
    }
    int ran = 0, replayed = 0, busy = 0;
    for (int t = 0; t < THREADS; t++) {
        CHECK(pthread_join(threads[t], NULL) == 0);
        ran += racers[t].ran;
        replayed += racers[t].replayed;
        busy += racers[t].busy;
    }
    for (int k = 0; k < KEYS; k++) {
        if (atomic_load(&g_runs[k]) != 1) {
            fprintf(stderr, "key race-%d ran %d times\n", k, atomic_load(&g_runs[k]));
            exit(1);
        }
    }
    CHECK_EQ_INT(ran, KEYS);
    CHECK_EQ_INT(replayed, (THREADS - 1) * KEYS);
    printf("   %d threads x %d keys: %d ran, %d replayed, %d in-progress answers\n", THREADS, KEYS,
           ran, replayed, busy);
    PASS("8 threads x 1000 keys: every operation ran exactly once");
}

typedef struct {
    uint64_t tokens[8];
    int calls;
    int fail_times;
    const char* key;
    const char* dest;
    int32_t check; /* what backup_idempotency_check_claim said inside the op */
} Fenced;

static int32_t fenced_op(void* user_data, uint64_t token) {
    Fenced* f = (Fenced*)user_data;
    if (f->calls < 8) f->tokens[f->calls] = token;
    f->calls++;
    f->check = backup_idempotency_check_claim(f->key, token);
    if (f->calls <= f->fail_times) return BACKUP_ERROR_NETWORK;
    if (!f->dest) return BACKUP_SUCCESS;
    return backup_plugin_write_file_fenced(f->dest, "block", 5, token);
}

static void test_fenced(const char* dir) {
    char dest[512];
    snprintf(dest, sizeof dest, "%s/fenced.dat", dir);
    /* Bad arguments. */
    Fenced f = {.key = "fenced"};
    CHECK_EQ_INT(backup_execute_idempotent_fenced(NULL, NULL, 0, fenced_op, &f, NULL), BACKUP_ERROR_INVALID_PARAM);
    CHECK_EQ_INT(backup_execute_idempotent_fenced("fenced", NULL, 0, NULL, &f, NULL), BACKUP_ERROR_INVALID_PARAM);
    CHECK_EQ_INT(backup_idempotency_check_claim(NULL, 1), BACKUP_ERROR_INVALID_PARAM);
    CHECK_EQ_INT(backup_idempotency_check_claim("fenced", 0), BACKUP_ERROR_INVALID_PARAM);
    CHECK_STR_CONTAINS(backup_plugin_get_last_error(), "fencing_token");
    CHECK_EQ_INT(f.calls, 0);

    /* The same token on every attempt of the policy; the claim checks as held inside op. */
    Fenced a = {.key = "fenced", .dest = dest, .fail_times = 2};
    bool replayed = true;
    CHECK_EQ_INT(backup_execute_idempotent_fenced("fenced", "p", 1, fenced_op, &a, &replayed), BACKUP_SUCCESS);
    CHECK(!replayed);
    CHECK_EQ_INT(a.calls, 3);
    CHECK(a.tokens[0] != 0);
    CHECK(a.tokens[0] == a.tokens[1] && a.tokens[1] == a.tokens[2]);
    CHECK_EQ_INT(a.check, BACKUP_SUCCESS);
    /* Replayed: op not called. Completed by this claim: its token still checks. */
    Fenced r = {.key = "fenced"};
    CHECK_EQ_INT(backup_execute_idempotent_fenced("fenced", "p", 1, fenced_op, &r, &replayed), BACKUP_SUCCESS);
    CHECK(replayed);
    CHECK_EQ_INT(r.calls, 0);
    CHECK_EQ_INT(backup_idempotency_check_claim("fenced", a.tokens[0]), BACKUP_SUCCESS);
    CHECK_EQ_INT(backup_idempotency_check_claim("fenced", a.tokens[0] - 1), BACKUP_ERROR_IDEMPOTENCY_CONFLICT);
    CHECK_EQ_INT(backup_idempotency_check_claim("never-claimed", a.tokens[0]), BACKUP_ERROR_LEASE_LOST);

    /* Forgotten and run again: a greater token, and the destination takes it. */
    CHECK_EQ_INT(backup_idempotency_forget("fenced"), BACKUP_SUCCESS);
    Fenced b = {.key = "fenced", .dest = dest};
    CHECK_EQ_INT(backup_execute_idempotent_fenced("fenced", "p", 1, fenced_op, &b, &replayed), BACKUP_SUCCESS);
    CHECK(b.tokens[0] > a.tokens[0]);
    /* A stale owner's late write is refused and leaves the file as it is. */
    CHECK_EQ_INT(backup_plugin_write_file_fenced(dest, "stale", 5, a.tokens[0]), BACKUP_ERROR_FENCED);
    CHECK_STR_CONTAINS(backup_plugin_get_last_error(), "fenced.dat");
    FILE* file = fopen(dest, "rb");
    CHECK(file != NULL);
    char got[16] = {0};
    CHECK_EQ_INT((int)fread(got, 1, sizeof got - 1, file), 5);
    fclose(file);
    CHECK_STR_CONTAINS(got, "block");
    /* A failed op releases its claim; the next claim's token is greater still. */
    CHECK_EQ_INT(backup_idempotency_forget("fenced"), BACKUP_SUCCESS);
    Fenced c = {.key = "fenced", .fail_times = 100};
    CHECK_EQ_INT(backup_execute_idempotent_fenced("fenced", "p", 1, fenced_op, &c, NULL), BACKUP_ERROR_RETRY_EXHAUSTED);
    Fenced d = {.key = "fenced"};
    CHECK_EQ_INT(backup_execute_idempotent_fenced("fenced", "p", 1, fenced_op, &d, NULL), BACKUP_SUCCESS);
    CHECK(c.tokens[0] > b.tokens[0] && d.tokens[0] > c.tokens[0]);
    PASS("fenced operations: tokens grow per key, one token per call, check_claim, stale writes refused");
}

static void test_metrics(void) {
    char text[16384];
    size_t len = 0;
    CHECK_EQ_INT(backup_plugin_get_metrics(text, sizeof text, &len), BACKUP_SUCCESS);
    CHECK_STR_CONTAINS(text, "# TYPE backup_idempotency_claims_total counter");
    CHECK_STR_CONTAINS(text, "backup_idempotency_conflicts_total 2");
    CHECK_STR_CONTAINS(text, "backup_idempotency_takeovers_total 0");
    CHECK_STR_CONTAINS(text, "backup_idempotency_replays_total");
    CHECK_STR_CONTAINS(text, "backup_idempotency_in_progress_total");
    PASS("idempotency counters in the metrics text");
}

int main(void) {
    char dir[] = "/tmp/backup_idem_XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    Op o = {0};
    CHECK_EQ_INT(backup_execute_idempotent("k", NULL, 0, op, &o, NULL), BACKUP_ERROR_NOT_INITIALIZED);
    CHECK_EQ_INT(backup_idempotency_forget("k"), BACKUP_ERROR_NOT_INITIALIZED);
    CHECK_EQ_INT(backup_idempotency_check_claim("k", 1), BACKUP_ERROR_NOT_INITIALIZED);
    CHECK_EQ_INT(backup_plugin_init("", 0), BACKUP_SUCCESS);
    CHECK_EQ_INT(backup_execute_idempotent("k", NULL, 0, op, &o, NULL), BACKUP_ERROR_INVALID_PARAM);
    CHECK_STR_CONTAINS(backup_plugin_get_last_error(), "state_dir");
    CHECK_EQ_INT(backup_idempotency_forget("k"), BACKUP_ERROR_INVALID_PARAM);
    CHECK_EQ_INT(o.calls, 0);
    backup_plugin_cleanup();

    char config[256];
    int len = snprintf(config, sizeof config,
                       "state_dir = \"%s/state\"\nerror_retry_max = 2\nerror_retry_interval = \"1ms\"\n", dir);
    CHECK_EQ_INT(backup_plugin_init(config, (uint32_t)len), BACKUP_SUCCESS);
    test_arguments();
    test_once_replay_conflict();
    test_failure_releases();
    test_in_progress();
    test_threads_race_over_the_same_keys();
    test_metrics();
    test_fenced(dir);
    backup_plugin_cleanup();

    /* After a restart the completed keys still replay. */
    CHECK_EQ_INT(backup_plugin_init(config, (uint32_t)len), BACKUP_SUCCESS);
    bool replayed = false;
    CHECK_EQ_INT(backup_execute_idempotent("race-7", "payload-7", 9, must_not_run, NULL, &replayed), BACKUP_SUCCESS);
    CHECK(replayed);
    backup_plugin_cleanup();
    PASS("completed keys replay after a restart");

    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0);
    printf("test_idempotency: all %d checks passed\n", g_checks);
    return 0;
}
