/* taosX stand-in: loads the backup plugin from a plugin directory exactly as taosX does
 * (dlopen, dlsym of each entry point, its TOML section passed length-delimited), then writes
 * a backup set of many files through it while transient failures are injected, shows a
 * progress bar, reads every file back to verify it, and prints a summary. Each file is
 * shipped under an idempotency key; after a restart of the plugin the whole batch is
 * submitted again, as a restarted pipeline would, and nothing is written twice. */
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>

#include "plugin_loader.h"

typedef struct {
    const char* config_path;
    const char* plugin_dir;
    const char* work_dir;
    int files;
    size_t file_size;
    double failure_rate;
    int threads;
} Options;

static BackupPlugin g_plugin;
static Options g_opt;
static atomic_int g_next_file, g_done, g_failed, g_injected, g_writes, g_replayed;

typedef struct {
    const char* path;
    const unsigned char* data;
    size_t size;
    unsigned int* seed;
} WriteJob;

/* One attempt of shipping a block: the network may drop (injected), else a durable write. */
static int32_t ship_block(void* user_data) {
    WriteJob* job = (WriteJob*)user_data;
    if ((double)rand_r(job->seed) / RAND_MAX < g_opt.failure_rate) {
        atomic_fetch_add(&g_injected, 1);
        static const int32_t transient[] = {BACKUP_ERROR_NETWORK, BACKUP_ERROR_CONNECTION_LOST,
                                            BACKUP_ERROR_TIMEOUT, BACKUP_ERROR_FILE_IO};
        return transient[rand_r(job->seed) % 4];
    }
    atomic_fetch_add(&g_writes, 1);
    return g_plugin.write_file_with_retry(job->path, job->data, job->size);
}

static void fill(unsigned char* buf, size_t size, int file) {
    uint32_t x = 2166136261u ^ (uint32_t)file;
    for (size_t i = 0; i < size; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        buf[i] = (unsigned char)x;
    }
}

static void* worker(void* arg) {
    unsigned int seed = (unsigned int)(uintptr_t)arg * 7919u + (unsigned int)time(NULL);
    unsigned char* data = (unsigned char*)malloc(g_opt.file_size);
    char path[4096];
    for (;;) {
        int i = atomic_fetch_add(&g_next_file, 1);
        if (i >= g_opt.files) break;
        snprintf(path, sizeof path, "%s/backup_set/vg%02d_block_%05d.dat", g_opt.work_dir, i % 4, i);
        fill(data, g_opt.file_size, i);
        WriteJob job = {path, data, g_opt.file_size, &seed};
        /* The key names the block; the content is the fingerprint. */
        bool replayed = false;
        if (g_plugin.execute_idempotent(path + strlen(g_opt.work_dir), data, g_opt.file_size, ship_block, &job,
                                        &replayed) != BACKUP_SUCCESS)
            atomic_fetch_add(&g_failed, 1);
        if (replayed) atomic_fetch_add(&g_replayed, 1);
        atomic_fetch_add(&g_done, 1);
    }
    free(data);
    return NULL;
}

static void progress(int done, int total, uint64_t retries) {
    const int width = 40;
    int filled = total ? done * width / total : width;
    fprintf(stderr, "\r  [");
    for (int i = 0; i < width; i++) fputc(i < filled ? '#' : '.', stderr);
    fprintf(stderr, "] %5d/%d files  %4llu retries", done, total, (unsigned long long)retries);
    fflush(stderr);
}

static int verify(void) {
    unsigned char* expect = (unsigned char*)malloc(g_opt.file_size);
    unsigned char* got = (unsigned char*)malloc(g_opt.file_size + 1);
    char path[4096];
    int bad = 0;
    for (int i = 0; i < g_opt.files; i++) {
        snprintf(path, sizeof path, "%s/backup_set/vg%02d_block_%05d.dat", g_opt.work_dir, i % 4, i);
        FILE* f = fopen(path, "rb");
        if (!f) continue; /* a file whose write gave up; counted as failed */
        size_t n = fread(got, 1, g_opt.file_size + 1, f);
        fclose(f);
        fill(expect, g_opt.file_size, i);
        if (n != g_opt.file_size || memcmp(got, expect, n) != 0) bad++;
    }
    free(expect);
    free(got);
    return bad;
}

/* Ships every block with the worker threads, with a progress bar; returns the seconds taken. */
static double run_pass(void) {
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pthread_t threads[64];
    for (int t = 0; t < g_opt.threads; t++) pthread_create(&threads[t], NULL, worker, (void*)(uintptr_t)(t + 1));
    uint64_t errors = 0, retries = 0;
    while (atomic_load(&g_done) < g_opt.files) {
        g_plugin.get_error_stats(&errors, &retries);
        progress(atomic_load(&g_done), g_opt.files, retries);
        usleep(50 * 1000);
    }
    for (int t = 0; t < g_opt.threads; t++) pthread_join(threads[t], NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    g_plugin.get_error_stats(&errors, &retries);
    progress(g_opt.files, g_opt.files, retries);
    fprintf(stderr, "\n");
    return (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;

}

static void usage(const char* argv0) {
    fprintf(stderr,
            "usage: %s --config taosx.toml --plugin-dir DIR --work-dir DIR [--files N] [--size BYTES]\n"
            "          [--failure-rate 0..1] [--threads N]\n",
            argv0);
}

int main(int argc, char** argv) {
    setvbuf(stdout, NULL, _IOLBF, 0); /* keep stdout and the stderr progress bar in order */
    g_opt = (Options){.files = 400, .file_size = 64 * 1024, .failure_rate = 0.25, .threads = 4};
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--config")) g_opt.config_path = argv[i + 1];
        else if (!strcmp(argv[i], "--plugin-dir")) g_opt.plugin_dir = argv[i + 1];
        else if (!strcmp(argv[i], "--work-dir")) g_opt.work_dir = argv[i + 1];
        else if (!strcmp(argv[i], "--files")) g_opt.files = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--size")) g_opt.file_size = (size_t)atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--failure-rate")) g_opt.failure_rate = atof(argv[i + 1]);
        else if (!strcmp(argv[i], "--threads")) g_opt.threads = atoi(argv[i + 1]);
        else { usage(argv[0]); return 2; }
    }
    if (!g_opt.config_path || !g_opt.plugin_dir || !g_opt.work_dir || g_opt.threads < 1 || g_opt.threads > 64) {
        usage(argv[0]);
        return 2;
    }

    if (backup_plugin_load(&g_plugin, g_opt.plugin_dir) != 0) return 1;
    printf("taosX host: loaded %s %s from %s\n", g_plugin.name(), g_plugin.version(), g_opt.plugin_dir);

    size_t toml_len = 0, section_len = 0;
    char* toml = loader_read_file(g_opt.config_path, &toml_len);
    if (!toml) { fprintf(stderr, "cannot read %s\n", g_opt.config_path); return 1; }
    const char* section = backup_plugin_section(toml, &section_len);
    if (!section) { fprintf(stderr, "%s has no %s section\n", g_opt.config_path, PLUGIN_SECTION); return 1; }
    int32_t rc = g_plugin.init(section, (uint32_t)section_len);
    if (rc != BACKUP_SUCCESS) {
        fprintf(stderr, "plugin init failed (%d %s): %s\n", rc, g_plugin.error_string(rc), g_plugin.get_last_error());
        return 1;
    }
    printf("taosX host: passed the %zu-byte %s section of %s\n", section_len, PLUGIN_SECTION, g_opt.config_path);

    char dir[4096];
    snprintf(dir, sizeof dir, "mkdir -p '%s/backup_set'", g_opt.work_dir);
    if (system(dir) != 0) return 1;
    printf("writing %d files of %zu bytes with %d threads, injecting transient failures at %.0f%%\n",
           g_opt.files, g_opt.file_size, g_opt.threads, g_opt.failure_rate * 100);

    double elapsed = run_pass();
    uint64_t errors = 0, retries = 0;
    g_plugin.get_error_stats(&errors, &retries);
    int corrupt = verify();
    int failed = atomic_load(&g_failed);
    /* Returned strings live until this thread's next call into the plugin: keep a copy. */
    const char* returned_path = g_plugin.get_error_log_path();
    char* log_path = returned_path ? strdup(returned_path) : NULL;
    printf("\nsummary\n");
    printf("  files written     %d of %d (%d gave up after retries)\n", g_opt.files - failed, g_opt.files, failed);
    printf("  verified          %d files read back, %d corrupt\n", g_opt.files - failed, corrupt);
    printf("  failures injected %d\n", atomic_load(&g_injected));
    printf("  retries           %llu\n", (unsigned long long)retries);
    printf("  errors recorded   %llu\n", (unsigned long long)errors);
    printf("  last error        %s\n", g_plugin.get_last_error());
    printf("  error log         %s\n", log_path ? log_path : "(none: no error was recorded)");
    printf("  elapsed           %.2f s\n", elapsed);
    free(log_path);

    /* taosX restarts and resubmits the same batch, as a pipeline does after a crash: every
     * block already shipped is replayed from the idempotency store, none is written twice. */
    g_plugin.cleanup();
    rc = g_plugin.init(section, (uint32_t)section_len);
    if (rc != BACKUP_SUCCESS) {
        fprintf(stderr, "plugin re-init failed (%d): %s\n", rc, g_plugin.get_last_error());
        return 1;
    }
    printf("\nplugin restarted; the same %d blocks submitted again\n", g_opt.files);
    int writes_before = atomic_load(&g_writes);
    atomic_store(&g_next_file, 0);
    atomic_store(&g_done, 0);
    atomic_store(&g_failed, 0);
    run_pass();
    int written_again = atomic_load(&g_writes) - writes_before;
    corrupt += verify();
    printf("  replayed          %d blocks (their operation not called)\n", atomic_load(&g_replayed));
    printf("  written again     %d (only blocks that gave up before: %d)\n", written_again, failed);
    char metrics[16384];
    size_t metrics_len = 0;
    if (g_plugin.get_metrics(metrics, sizeof metrics, &metrics_len) == BACKUP_SUCCESS) {
        for (char* line = strtok(metrics, "\n"); line; line = strtok(NULL, "\n"))
            if (!strncmp(line, "backup_idempotency_", 19)) printf("  %s\n", line);
    }

    g_plugin.cleanup();
    backup_plugin_unload(&g_plugin);
    free(toml);
    /* A block that gave up in the first pass is rightly shipped in the second. */
    return corrupt == 0 && written_again <= failed ? 0 : 1;
}
