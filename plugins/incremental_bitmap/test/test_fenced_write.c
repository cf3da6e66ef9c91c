/* Fenced writes through the C ABI: the code's value, a lower token refused with the file
 * untouched and the refusal named in the last error, an equal token rewriting, a higher one
 * replacing, bad arguments, the call before init, and 8 threads racing shuffled tokens. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdint.h>
#include <sys/stat.h>
#include <unistd.h>

#include "backup_coordinator.h"
#include "check.h"

enum { THREADS = 8, PER_THREAD = 25 };

static char g_dir[] = "/tmp/backup_fenced_XXXXXX";
static char g_path[256];

/* The file's whole content, NUL-terminated, in a static buffer. */
static const char* read_file(const char* path) {
    static char buf[4096];
    FILE* f = fopen(path, "rb");
    CHECK(f != NULL);
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    return buf;
}

static int32_t write_text(const char* path, const char* text, uint64_t token) {
    return backup_plugin_write_file_fenced(path, text, strlen(text), token);
}

static void test_before_init(void) {
    CHECK_EQ_INT(BACKUP_ERROR_FENCED, -18);
    CHECK(strcmp(backup_error_string(BACKUP_ERROR_FENCED), "Fenced by a newer claim") == 0);
    /* Resolvable by name, as a host that dlopens the plugin finds it. */
    CHECK(dlsym(RTLD_DEFAULT, "backup_plugin_write_file_fenced") != NULL);
    CHECK_EQ_INT(write_text(g_path, "x", 1), BACKUP_ERROR_NOT_INITIALIZED);
    /* Argument checks come first. */
    CHECK_EQ_INT(write_text(NULL, "x", 1), BACKUP_ERROR_INVALID_PARAM);
    CHECK_EQ_INT(write_text(g_path, "x", 0), BACKUP_ERROR_INVALID_PARAM);
    CHECK(access(g_path, F_OK) != 0);
    PASS("FENCED is -18; before init: NOT_INITIALIZED, bad arguments first");
}

static void test_tokens(void) {
    CHECK_EQ_INT(write_text(g_path, "claim 5", 5), BACKUP_SUCCESS);
    CHECK(strcmp(read_file(g_path), "claim 5") == 0);
    struct stat before, after;
    CHECK(stat(g_path, &before) == 0);
    usleep(20000); /* a rewrite would show in the mtime */

    uint64_t errors0 = 0, retries0 = 0, errors1 = 0, retries1 = 0;
    backup_plugin_get_error_stats(&errors0, &retries0);
    CHECK_EQ_INT(write_text(g_path, "stale claim 4", 4), BACKUP_ERROR_FENCED);
    backup_plugin_get_error_stats(&errors1, &retries1);
    CHECK_EQ_INT(errors1, errors0 + 1);
    CHECK_EQ_INT(retries1, retries0); /* permanent: never retried */
    const char* last = backup_plugin_get_last_error();
    CHECK_STR_CONTAINS(last, g_path);
    CHECK_STR_CONTAINS(last, "token 4");
    CHECK_STR_CONTAINS(last, "token 5");
    CHECK(strcmp(read_file(g_path), "claim 5") == 0);
    CHECK(stat(g_path, &after) == 0);
    CHECK_EQ_INT(after.st_ino, before.st_ino);
    CHECK_EQ_INT(after.st_mtim.tv_sec, before.st_mtim.tv_sec);
    CHECK_EQ_INT(after.st_mtim.tv_nsec, before.st_mtim.tv_nsec);
    PASS("a lower token is FENCED, the file untouched, the refusal named");

    CHECK_EQ_INT(write_text(g_path, "claim 5, retried", 5), BACKUP_SUCCESS);
    CHECK(strcmp(read_file(g_path), "claim 5, retried") == 0);
    PASS("an equal token rewrites");

    CHECK_EQ_INT(write_text(g_path, "claim 6", 6), BACKUP_SUCCESS);
    CHECK(strcmp(read_file(g_path), "claim 6") == 0);
    CHECK_EQ_INT(write_text(g_path, "claim 5 again", 5), BACKUP_ERROR_FENCED);
    CHECK(strcmp(read_file(g_path), "claim 6") == 0);
    PASS("a higher token replaces, and fences the one before it");
}

static void test_arguments(void) {
    char dir_path[300];
    snprintf(dir_path, sizeof dir_path, "%s/", g_dir);
    CHECK_EQ_INT(write_text(NULL, "x", 7), BACKUP_ERROR_INVALID_PARAM);
    CHECK_STR_CONTAINS(backup_plugin_get_last_error(), "file_path");
    CHECK_EQ_INT(write_text("", "x", 7), BACKUP_ERROR_INVALID_PARAM);
    CHECK_EQ_INT(write_text(dir_path, "x", 7), BACKUP_ERROR_INVALID_PARAM);
    CHECK_EQ_INT(backup_plugin_write_file_fenced(g_path, NULL, 3, 7), BACKUP_ERROR_INVALID_PARAM);
    CHECK_STR_CONTAINS(backup_plugin_get_last_error(), "data");
    CHECK_EQ_INT(write_text(g_path, "x", 0), BACKUP_ERROR_INVALID_PARAM);
    CHECK_STR_CONTAINS(backup_plugin_get_last_error(), "fencing_token");
    CHECK(strcmp(read_file(g_path), "claim 6") == 0);
    /* Empty data is a write like any other. */
    CHECK_EQ_INT(backup_plugin_write_file_fenced(g_path, NULL, 0, 7), BACKUP_SUCCESS);
    CHECK(strcmp(read_file(g_path), "") == 0);
    PASS("NULL, empty or directory paths, NULL data and token 0 are INVALID_PARAM");
}

static char g_race_path[256];
static uint64_t g_tokens[THREADS * PER_THREAD];

/* Returns the first code that was neither SUCCESS nor FENCED (checked by the joiner, so
 * that the check counter is only touched by the main thread). */
static void* race(void* arg) {
    size_t t = (size_t)arg;
    for (size_t i = 0; i < PER_THREAD; i++) {
        uint64_t token = g_tokens[t * PER_THREAD + i];
        char text[64];
        snprintf(text, sizeof text, "token %llu", (unsigned long long)token);
        int32_t rc = write_text(g_race_path, text, token);
        if (rc != BACKUP_SUCCESS && rc != BACKUP_ERROR_FENCED) return (void*)(intptr_t)rc;
    }
    return NULL;
}

static void test_threads_race(void) {
    snprintf(g_race_path, sizeof g_race_path, "%s/race.dat", g_dir);
    size_t n = THREADS * PER_THREAD;
    for (size_t i = 0; i < n; i++) g_tokens[i] = i + 1;
    srand(7);
    for (size_t i = n - 1; i > 0; i--) { /* Fisher-Yates */
        size_t j = (size_t)rand() % (i + 1);
        uint64_t tmp = g_tokens[i];
        g_tokens[i] = g_tokens[j];
        g_tokens[j] = tmp;
    }
    pthread_t threads[THREADS];
    for (size_t t = 0; t < THREADS; t++) CHECK(pthread_create(&threads[t], NULL, race, (void*)t) == 0);
    for (size_t t = 0; t < THREADS; t++) {
        void* unexpected = NULL;
        CHECK(pthread_join(threads[t], &unexpected) == 0);
        CHECK_EQ_INT((intptr_t)unexpected, 0);
    }
    char want[64];
    snprintf(want, sizeof want, "token %zu", n);
    CHECK(strcmp(read_file(g_race_path), want) == 0);
    CHECK_EQ_INT(write_text(g_race_path, "late", (uint64_t)n - 1), BACKUP_ERROR_FENCED);
    PASS("8 threads racing shuffled tokens: the highest token's content wins");
}

int main(void) {
    CHECK(mkdtemp(g_dir) != NULL);
    snprintf(g_path, sizeof g_path, "%s/set.dat", g_dir);
    test_before_init();
    const char config[] = "error_retry_max = 2\nerror_retry_interval = 0\n";
    CHECK_EQ_INT(backup_plugin_init(config, (uint32_t)strlen(config)), BACKUP_SUCCESS);
    test_tokens();
    test_arguments();
    test_threads_race();
    backup_plugin_cleanup();

    /* After a restart the fence still holds. */
    CHECK_EQ_INT(backup_plugin_init(config, (uint32_t)strlen(config)), BACKUP_SUCCESS);
    CHECK_EQ_INT(write_text(g_path, "stale", 6), BACKUP_ERROR_FENCED);
    CHECK_EQ_INT(write_text(g_path, "claim 8", 8), BACKUP_SUCCESS);
    backup_plugin_cleanup();
    PASS("the fence holds across a restart");

    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", g_dir);
    CHECK(system(cmd) == 0);
    printf("test_fenced_write: all %d checks passed\n", g_checks);
    return 0;
}
