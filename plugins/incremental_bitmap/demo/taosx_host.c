/* taosX stand-in: loads the backup plugin from a plugin directory exactly as taosX does
 * (dlopen, dlsym of each entry point, its TOML section passed length-delimited), then writes
 * a backup set of many files through it while transient failures are injected, reads every
 * file back to verify it, and prints a summary. Each file is shipped under an idempotency
 * key with backup_execute_idempotent_fenced: the operation gets the claim's fencing token
 * and writes with backup_plugin_write_file_fenced, which refuses a write with a lower token
 * than one already made (a host that stalled past its lease and woke up late). After a
 * restart of the plugin the whole batch is submitted again, as a restarted pipeline would,
 * and nothing is written twice.
 *
 * Every path the demo uses lives under --work-dir: the backup set (unless --shared-dir puts
 * it elsewhere), and the plugin's state_dir, error_store_path and log_path, which replace
 * those of the config's section (the config file itself keeps the layout of a real taosX
 * installation). The exit code says whether every file is on disk with the right content.
 *
 * With --shared-dir, every transfer, write and outcome is printed as a `fence-log` line
 * with CLOCK_MONOTONIC nanoseconds (shared by the processes of one machine), so that the
 * cluster demo can check the fence's order over all its hosts. */
#include <errno.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>

#include "plugin_loader.h"

typedef struct {
    const char* config_path;
    const char* plugin_dir; /* NULL: the config's plugins_home */
    const char* work_dir;
    long files;
    long file_size;
    double failure_rate;
    long threads;
    const char* peers; /* NULL, or other hosts' work dirs (':'-separated) sharing the keys */
    const char* shared_dir; /* NULL, or where the backup set goes (hosts sharing one destination) */
    long op_delay_ms;       /* each op's transfer time, between its token and its write */
} Options;

static BackupPlugin g_plugin;
static Options g_opt;
/* Counters of one pass; run_pass resets them. g_writes: writes the fence accepted;
 * g_refused: writes it refused (FENCED); g_lease_lost: calls answering LEASE_LOST;
 * g_failed: calls that gave up otherwise (with hosts sharing the keys, FENCED and
 * LEASE_LOST are a stalled host's expected outcomes; alone, they are failures too). */
static atomic_int g_next_file, g_done, g_failed, g_injected, g_writes, g_replayed, g_refused, g_lease_lost;

/* Whether other hosts ship the same blocks under the same keys. */
static bool shared(void) { return g_opt.peers || g_opt.shared_dir; }

/* Where the backup set goes: the shared destination, else the work dir. */
static const char* blocks_dir(void) { return g_opt.shared_dir ? g_opt.shared_dir : g_opt.work_dir; }

static unsigned long long mono_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (unsigned long long)t.tv_sec * 1000000000ull + (unsigned long long)t.tv_nsec;
}

typedef struct {
    const char* key;
    const char* path;
    const unsigned char* data;
    size_t size;
    unsigned int* seed;
    uint64_t token; /* the token the last attempt got */
} WriteJob;

/* One attempt of shipping a block under the claim `token`: the network may drop
 * (injected), else the block's transfer (--op-delay-ms) and its fenced durable write. */
static int32_t ship_block(void* user_data, uint64_t token) {
    WriteJob* job = (WriteJob*)user_data;
    job->token = token;
    if ((double)rand_r(job->seed) / RAND_MAX < g_opt.failure_rate) {
        atomic_fetch_add(&g_injected, 1);
        static const int32_t transient[] = {BACKUP_ERROR_NETWORK, BACKUP_ERROR_CONNECTION_LOST,
                                            BACKUP_ERROR_TIMEOUT, BACKUP_ERROR_FILE_IO};
        return transient[rand_r(job->seed) % 4];
    }
    bool log = g_opt.shared_dir != NULL;
    if (log) printf("fence-log transfer %s token=%llu t=%llu\n", job->key, (unsigned long long)token, mono_ns());
    if (g_opt.op_delay_ms > 0) {
        struct timespec left = {g_opt.op_delay_ms / 1000, (g_opt.op_delay_ms % 1000) * 1000000L};
        while (nanosleep(&left, &left) != 0 && errno == EINTR) {
        }
    }
    unsigned long long t0 = mono_ns();
    if (log) printf("fence-log write %s token=%llu t=%llu\n", job->key, (unsigned long long)token, t0);
    int32_t rc = g_plugin.write_file_fenced(job->path, job->data, job->size, token);
    unsigned long long t1 = mono_ns();
    const char* outcome = "failed";
    if (rc == BACKUP_SUCCESS) {
        atomic_fetch_add(&g_writes, 1);
        outcome = "accepted";
    } else if (rc == BACKUP_ERROR_FENCED) {
        atomic_fetch_add(&g_refused, 1);
        outcome = "refused";
    }
    if (log)
        printf("fence-log %s %s token=%llu t0=%llu t1=%llu rc=%d\n", outcome, job->key, (unsigned long long)token,
               t0, t1, rc);
    return rc;
}

static void fill(unsigned char* buf, size_t size, long file) {
    uint32_t x = 2166136261u ^ (uint32_t)file;
    for (size_t i = 0; i < size; i++) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        buf[i] = (unsigned char)x;
    }
}

static void block_path(char* out, size_t cap, long i) {
    snprintf(out, cap, "%s/backup_set/vg%02ld_block_%05ld.dat", blocks_dir(), i % 4, i);
}

static void* worker(void* arg) {
    unsigned int seed = (unsigned int)(uintptr_t)arg * 7919u + (unsigned int)time(NULL);
    unsigned char* data = (unsigned char*)malloc((size_t)g_opt.file_size);
    char path[4096];
    for (;;) {
        int i = atomic_fetch_add(&g_next_file, 1);
        if (i >= g_opt.files) break;
        block_path(path, sizeof path, i);
        fill(data, (size_t)g_opt.file_size, i);
        /* The key names the block (relative to where the set goes); the content is the
         * fingerprint. */
        const char* key = path + strlen(blocks_dir());
        WriteJob job = {key, path, data, (size_t)g_opt.file_size, &seed, 0};
        bool replayed = false;
        int32_t rc;
        /* With --peers, another host may be running the same key: wait for its outcome (a
         * replay, or a takeover once a dead or stalled host's lease ran out). */
        while ((rc = g_plugin.execute_idempotent_fenced(key, data, (size_t)g_opt.file_size, ship_block, &job,
                                                        &replayed)) == BACKUP_ERROR_IN_PROGRESS &&
               g_opt.peers)
            usleep(20 * 1000);
        /* FENCED: this host's write came after a newer claim's (it stalled past its lease),
         * the block is that claim's. LEASE_LOST: the write was accepted, late; a newer claim's
         * write, if any, replaces it in token order. */
        if (rc == BACKUP_ERROR_LEASE_LOST) {
            atomic_fetch_add(&g_lease_lost, 1);
            if (g_opt.shared_dir)
                printf("fence-log lease-lost %s token=%llu t=%llu\n", key, (unsigned long long)job.token, mono_ns());
        }
        bool expected = shared() && (rc == BACKUP_ERROR_FENCED || rc == BACKUP_ERROR_LEASE_LOST);
        if (rc != BACKUP_SUCCESS && !expected) atomic_fetch_add(&g_failed, 1);
        if (replayed) atomic_fetch_add(&g_replayed, 1);
        atomic_fetch_add(&g_done, 1);
    }
    free(data);
    return NULL;
}

static void progress(int done, long total, uint64_t retries) {
    const int width = 40;
    long filled = total ? done * width / total : width;
    fprintf(stderr, "\r  [");
    for (int i = 0; i < width; i++) fputc(i < filled ? '#' : '.', stderr);
    fprintf(stderr, "] %5d/%ld files  %4llu retries", done, total, (unsigned long long)retries);
    fflush(stderr);
}

typedef struct {
    int verified, missing, wrong;
} Verification;

/* Whether the block's file in `dir` is there (1) and intact (else counted in *wrong). */
static int check_copy(const char* dir, long i, const unsigned char* expect, unsigned char* got, int* wrong) {
    char path[4096];
    snprintf(path, sizeof path, "%s/backup_set/vg%02ld_block_%05ld.dat", dir, i % 4, i);
    FILE* f = fopen(path, "rb");
    if (!f) return 0;
    size_t n = fread(got, 1, (size_t)g_opt.file_size + 1, f);
    fclose(f);
    if (n != (size_t)g_opt.file_size || memcmp(got, expect, n) != 0) (*wrong)++;
    return 1;
}

/* Reads every file of the set back (from --shared-dir when given, else the work dir): a
 * file that is absent or differs from what was sent (fill(i)) is counted, never skipped.
 * With --peers, a block lives in exactly one of the hosts' dirs: a second copy is counted
 * wrong. */
static Verification verify(void) {
    Verification v = {0, 0, 0};
    unsigned char* expect = (unsigned char*)malloc((size_t)g_opt.file_size);
    unsigned char* got = (unsigned char*)malloc((size_t)g_opt.file_size + 1);
    for (long i = 0; i < g_opt.files; i++) {
        fill(expect, (size_t)g_opt.file_size, i);
        int wrong = 0, copies = check_copy(blocks_dir(), i, expect, got, &wrong);
        for (const char* p = g_opt.peers; p && *p;) {
            const char* end = strchr(p, ':');
            size_t len = end ? (size_t)(end - p) : strlen(p);
            char peer[4096];
            snprintf(peer, sizeof peer, "%.*s", (int)len, p);
            copies += check_copy(peer, i, expect, got, &wrong);
            p = end ? end + 1 : p + len;
        }
        if (copies == 0)
            v.missing++;
        else if (wrong || copies > 1)
            v.wrong++;
        else
            v.verified++;
    }
    free(expect);
    free(got);
    return v;
}

/* Ships every block with the worker threads; returns the seconds taken. The bar is drawn
 * only on a terminal, so that a log or a pipe gets the summary alone. */
static double run_pass(void) {
    atomic_store(&g_next_file, 0);
    atomic_store(&g_done, 0);
    atomic_store(&g_failed, 0);
    atomic_store(&g_injected, 0);
    atomic_store(&g_writes, 0);
    atomic_store(&g_replayed, 0);
    atomic_store(&g_refused, 0);
    atomic_store(&g_lease_lost, 0);
    bool bar = isatty(STDERR_FILENO);
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pthread_t threads[64];
    for (long t = 0; t < g_opt.threads; t++) pthread_create(&threads[t], NULL, worker, (void*)(uintptr_t)(t + 1));
    uint64_t errors = 0, retries = 0;
    while (bar && atomic_load(&g_done) < g_opt.files) {
        g_plugin.get_error_stats(&errors, &retries);
        progress(atomic_load(&g_done), g_opt.files, retries);
        usleep(50 * 1000);
    }
    for (long t = 0; t < g_opt.threads; t++) pthread_join(threads[t], NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (bar) {
        g_plugin.get_error_stats(&errors, &retries);
        progress(atomic_load(&g_done), g_opt.files, retries);
        fprintf(stderr, "\n");
    }
    return (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
}

static void usage(FILE* out, const char* argv0) {
    fprintf(out,
            "usage: %s --config FILE --work-dir DIR [--plugin-dir DIR] [--files N] [--size BYTES]\n"
            "          [--failure-rate RATE] [--threads N] [--peers DIR:DIR...] [--shared-dir DIR]\n"
            "          [--op-delay-ms N]\n"
            "  --config FILE         a taosX config with a [plugins.incremental_bitmap] section\n"
            "  --work-dir DIR        every file the demo writes goes under DIR: backup_set/, and the\n"
            "                        plugin's state/, errors/ and logs/ (replacing the config's paths)\n"
            "  --plugin-dir DIR      where libbackup_coordinator.so is (default: the config's plugins_home)\n"
            "  --files N             files in the backup set, 1 to 1000000 (default 400)\n"
            "  --size BYTES          bytes per file, 1 to 67108864 (default 65536)\n"
            "  --failure-rate RATE   share of attempts failing with a transient error, 0 <= RATE < 1\n"
            "                        (default 0.25)\n"
            "  --threads N           writer threads, 1 to 64 (default 4)\n"
            "  --peers DIRS          other hosts' work dirs (':'-separated) sharing the same keys (a\n"
            "                        shared etcd state store): each block must be in exactly one dir\n"
            "  --shared-dir DIR      write the backup set under DIR/backup_set, a destination shared\n"
            "                        with other hosts, and log each transfer, write and outcome as a\n"
            "                        'fence-log' line (CLOCK_MONOTONIC ns); a late write refused by\n"
            "                        the fence (FENCED) and LEASE_LOST are then expected, not failures\n"
            "  --op-delay-ms N       each block's transfer: its op sleeps N ms between getting its\n"
            "                        fencing token and writing, 0 to 60000 (default 0)\n"
            "  --help                this text\n"
            "Exit code: 0 when every file was written and read back intact, 1 otherwise,\n"
            "2 for bad arguments.\n",
            argv0);
}

static bool parse_long(const char* text, long min, long max, long* out) {
    char* end = NULL;
    errno = 0;
    long v = strtol(text, &end, 10);
    if (errno != 0 || end == text || *end != '\0' || v < min || v > max) return false;
    *out = v;
    return true;
}

static bool parse_rate(const char* text, double* out) {
    char* end = NULL;
    errno = 0;
    double v = strtod(text, &end);
    if (errno != 0 || end == text || *end != '\0' || !isfinite(v) || v < 0.0 || v >= 1.0) return false;
    *out = v;
    return true;
}

/* Parses the command line; returns -1 to go on, else the exit code. */
static int parse_args(int argc, char** argv) {
    g_opt = (Options){.files = 400, .file_size = 64 * 1024, .failure_rate = 0.25, .threads = 4};
    for (int i = 1; i < argc; i++) {
        const char* arg = argv[i];
        if (!strcmp(arg, "--help") || !strcmp(arg, "-h")) {
            usage(stdout, argv[0]);
            return 0;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "%s: %s needs a value\n", argv[0], arg);
            usage(stderr, argv[0]);
            return 2;
        }
        const char* value = argv[++i];
        bool ok = true;
        if (!strcmp(arg, "--config")) g_opt.config_path = value;
        else if (!strcmp(arg, "--plugin-dir")) g_opt.plugin_dir = value;
        else if (!strcmp(arg, "--work-dir")) g_opt.work_dir = value;
        else if (!strcmp(arg, "--files")) ok = parse_long(value, 1, 1000000, &g_opt.files);
        else if (!strcmp(arg, "--size")) ok = parse_long(value, 1, 64L << 20, &g_opt.file_size);
        else if (!strcmp(arg, "--failure-rate")) ok = parse_rate(value, &g_opt.failure_rate);
        else if (!strcmp(arg, "--threads")) ok = parse_long(value, 1, 64, &g_opt.threads);
        else if (!strcmp(arg, "--peers")) g_opt.peers = value;
        else if (!strcmp(arg, "--shared-dir")) g_opt.shared_dir = value;
        else if (!strcmp(arg, "--op-delay-ms")) ok = parse_long(value, 0, 60000, &g_opt.op_delay_ms);
        else {
            fprintf(stderr, "%s: unknown option %s\n", argv[0], arg);
            usage(stderr, argv[0]);
            return 2;
        }
        if (!ok || value[0] == '\0') {
            fprintf(stderr, "%s: bad value for %s: '%s'\n", argv[0], arg, value);
            usage(stderr, argv[0]);
            return 2;
        }
    }
    if (!g_opt.config_path || !g_opt.work_dir) {
        fprintf(stderr, "%s: --config and --work-dir are required\n", argv[0]);
        usage(stderr, argv[0]);
        return 2;
    }
    if (strpbrk(g_opt.work_dir, "'\n") || strlen(g_opt.work_dir) > 3000) {
        fprintf(stderr, "%s: --work-dir must not contain ' or a newline, nor exceed 3000 bytes\n", argv[0]);
        return 2;
    }
    if (g_opt.shared_dir && (strpbrk(g_opt.shared_dir, "'\n") || strlen(g_opt.shared_dir) > 3000)) {
        fprintf(stderr, "%s: --shared-dir must not contain ' or a newline, nor exceed 3000 bytes\n", argv[0]);
        usage(stderr, argv[0]);
        return 2;
    }
    return -1;
}

/* The value of a top-level `key = "value"` of the taosX config (before any table), or NULL. */
static char* top_level_string(const char* toml, const char* key) {
    size_t key_len = strlen(key);
    for (const char* line = toml; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
        while (*line == ' ' || *line == '\t') line++;
        if (*line == '[') return NULL;
        if (strncmp(line, key, key_len) != 0) continue;
        const char* p = line + key_len;
        while (*p == ' ' || *p == '\t') p++;
        if (*p++ != '=') continue;
        while (*p == ' ' || *p == '\t') p++;
        char quote = *p;
        if (quote != '"' && quote != '\'') return NULL;
        const char* end = strchr(p + 1, quote);
        return end ? strndup(p + 1, (size_t)(end - p - 1)) : NULL;
    }
    return NULL;
}

/* Whether a line of the section sets `key` (possibly dotted, as in `log.path`). */
static bool sets_key(const char* line, const char* key) {
    while (*line == ' ' || *line == '\t') line++;
    size_t n = strlen(key);
    if (strncmp(line, key, n) != 0) return false;
    line += n;
    while (*line == ' ' || *line == '\t') line++;
    return *line == '=';
}

/* The plugin's section with its paths moved under the work dir: the lines setting them are
 * dropped and the work dir's paths appended. The caller frees the result. */
static char* section_for_work_dir(const char* section, size_t len, size_t* out_len) {
    static const char* moved[] = {"error_store_path", "state_dir", "log_path", "log.path"};
    size_t cap = len + 3 * 4096 + 256;
    char* out = (char*)malloc(cap);
    size_t used = 0;
    const char* end = section + len;
    for (const char* line = section; line < end;) {
        const char* next = memchr(line, '\n', (size_t)(end - line));
        next = next ? next + 1 : end;
        char copy[4096];
        size_t n = (size_t)(next - line) < sizeof copy - 1 ? (size_t)(next - line) : sizeof copy - 1;
        memcpy(copy, line, n);
        copy[n] = '\0';
        bool drop = false;
        for (size_t k = 0; k < sizeof moved / sizeof *moved; k++) drop |= sets_key(copy, moved[k]);
        if (!drop) {
            memcpy(out + used, line, (size_t)(next - line));
            used += (size_t)(next - line);
        }
        line = next;
    }
    if (used > 0 && out[used - 1] != '\n') out[used++] = '\n';
    used += (size_t)snprintf(out + used, cap - used,
                             "# moved under the demo's work dir\n"
                             "error_store_path = '%s/errors'\nstate_dir = '%s/state'\nlog_path = '%s/logs'\n",
                             g_opt.work_dir, g_opt.work_dir, g_opt.work_dir);
    *out_len = used;
    return out;
}

/* The plugin's metric lines starting with one of the prefixes. */
static void print_metrics(const char* const* prefixes, size_t count) {
    char metrics[16384];
    size_t metrics_len = 0;
    if (g_plugin.get_metrics(metrics, sizeof metrics, &metrics_len) != BACKUP_SUCCESS) return;
    for (char* line = strtok(metrics, "\n"); line; line = strtok(NULL, "\n"))
        for (size_t k = 0; k < count; k++)
            if (!strncmp(line, prefixes[k], strlen(prefixes[k]))) printf("  %s\n", line);
}

static void print_pass(const char* title, Verification v, double elapsed) {
    uint64_t errors = 0, retries = 0;
    g_plugin.get_error_stats(&errors, &retries);
    int failed = atomic_load(&g_failed), refused = atomic_load(&g_refused);
    printf("\n%s\n", title);
    if (shared())
        printf("  files shipped     %ld (%d gave up after retries, %d left to a newer claim)\n",
               g_opt.files - failed - refused, failed, refused);
    else
        printf("  files shipped     %ld (%d gave up after retries)\n", g_opt.files - failed, failed);
    printf("  written by op     %d (writes the fence accepted)\n", atomic_load(&g_writes));
    printf("  refused by fence  %d (late writes: a newer claim of the block had written it)\n", refused);
    printf("  lease lost        %d (calls answering LEASE_LOST: op succeeded after its claim lapsed)\n",
           atomic_load(&g_lease_lost));
    printf("  replayed          %d (their operation not called)\n", atomic_load(&g_replayed));
    printf("  failures injected %d\n", atomic_load(&g_injected));
    printf("  verified          %d of %ld files read back intact, %d missing, %d wrong\n", v.verified,
           g_opt.files, v.missing, v.wrong);
    printf("  retries           %llu (since init)\n", (unsigned long long)retries);
    printf("  errors recorded   %llu (since init)\n", (unsigned long long)errors);
    printf("  elapsed           %.2f s\n", elapsed);
}

int main(int argc, char** argv) {
    setvbuf(stdout, NULL, _IOLBF, 0); /* keep stdout and the stderr progress bar in order */
    int parsed = parse_args(argc, argv);
    if (parsed >= 0) return parsed;

    size_t toml_len = 0, section_len = 0;
    char* toml = loader_read_file(g_opt.config_path, &toml_len);
    if (!toml) {
        fprintf(stderr, "cannot read %s: %s\n", g_opt.config_path, strerror(errno));
        return 1;
    }
    char* plugins_home = top_level_string(toml, "plugins_home");
    const char* plugin_dir = g_opt.plugin_dir ? g_opt.plugin_dir : plugins_home;
    if (!plugin_dir) {
        fprintf(stderr, "no --plugin-dir, and %s sets no plugins_home\n", g_opt.config_path);
        return 2;
    }
    if (backup_plugin_load(&g_plugin, plugin_dir) != 0) return 1;
    printf("taosX host: loaded %s %s from %s\n", g_plugin.name(), g_plugin.version(), plugin_dir);

    const char* section = backup_plugin_section(toml, &section_len);
    if (!section) {
        fprintf(stderr, "%s has no %s section\n", g_opt.config_path, PLUGIN_SECTION);
        return 1;
    }
    size_t config_len = 0;
    char* config = section_for_work_dir(section, section_len, &config_len);
    int32_t rc = g_plugin.init(config, (uint32_t)config_len);
    if (rc != BACKUP_SUCCESS) {
        fprintf(stderr, "plugin init failed (%d %s): %s\n", rc, g_plugin.error_string(rc), g_plugin.get_last_error());
        return 1;
    }
    printf("taosX host: passed the %s section of %s (%zu bytes), its paths under %s\n", PLUGIN_SECTION,
           g_opt.config_path, config_len, g_opt.work_dir);

    char dir[4096];
    snprintf(dir, sizeof dir, "mkdir -p '%s/backup_set'", blocks_dir());
    if (system(dir) != 0) return 1;
    printf("writing %ld files of %ld bytes with %ld threads, injecting transient failures at %.0f%%\n",
           g_opt.files, g_opt.file_size, g_opt.threads, g_opt.failure_rate * 100);
    printf("each block shipped under a fencing token (backup_execute_idempotent_fenced), written with\n"
           "backup_plugin_write_file_fenced into %s/backup_set\n",
           blocks_dir());
    if (g_opt.op_delay_ms) printf("each block's transfer takes %ld ms between its token and its write\n", g_opt.op_delay_ms);
    if (g_opt.shared_dir)
        printf("a destination shared with other hosts: fence-log lines give each transfer, write and\n"
               "outcome with CLOCK_MONOTONIC ns (pid %d)\n",
               (int)getpid());

    double elapsed = run_pass();
    Verification first = verify();
    int gave_up = atomic_load(&g_failed);
    print_pass("first pass", first, elapsed);
    /* Returned strings live until this thread's next call into the plugin: print at once. */
    const char* log_path = g_plugin.get_error_log_path();
    printf("  error log         %s\n", log_path ? log_path : "(none: no error was recorded)");
    printf("  diagnostics       %s/logs/\n", g_opt.work_dir);
    static const char* const store_metrics[] = {"backup_idempotency_", "backup_state_store_"};
    if (g_opt.peers) print_metrics(store_metrics, 2);
    /* Every file the pass did not give up on must be on disk, intact (with peers, a block
     * this host gave up on may have been shipped by another host). A block whose late write
     * was refused was written by the newer claim; one answered LEASE_LOST was written by
     * this host, late, in token order. */
    bool ok = first.wrong == 0 && (g_opt.peers ? first.missing <= gave_up : first.missing == gave_up);

    /* taosX restarts and resubmits the same batch, as a pipeline does after a crash: every
     * block already shipped is replayed from the idempotency store, none is written twice. */
    g_plugin.cleanup();
    rc = g_plugin.init(config, (uint32_t)config_len);
    if (rc != BACKUP_SUCCESS) {
        fprintf(stderr, "plugin re-init failed (%d): %s\n", rc, g_plugin.get_last_error());
        return 1;
    }
    printf("\nplugin restarted; the same %ld blocks submitted again\n", g_opt.files);
    elapsed = run_pass();
    Verification second = verify();
    print_pass("second pass", second, elapsed);
    int written_again = atomic_load(&g_writes);
    print_metrics(store_metrics, g_opt.peers ? 2 : 1);
    /* Only blocks that gave up before are shipped again; after it, the whole set is there. */
    int replayed_again = atomic_load(&g_replayed);
    ok = ok && written_again <= gave_up &&
         (g_opt.peers ? replayed_again >= g_opt.files - gave_up : replayed_again == g_opt.files - gave_up) &&
         second.verified == g_opt.files;

    g_plugin.cleanup();
    backup_plugin_unload(&g_plugin);
    free(config);
    free(plugins_home);
    free(toml);
    printf("\n%s: %d of %ld files on disk and intact\n", ok ? "PASS" : "FAIL", second.verified, g_opt.files);
    return ok ? 0 : 1;
}
