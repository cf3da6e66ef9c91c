/* Assertion helpers of the C harnesses, in two families with one output format:
 *
 *   CHECK, CHECK_EQ_INT, CHECK_STR_CONTAINS   fatal: a failed check prints where and what,
 *                                             and the harness exits 1 at once;
 *   EXPECT, EXPECT_INT, EXPECT_STR,           not fatal: a failed check prints the same way,
 *   EXPECT_HAS, EXPECTF                       is counted, and the run goes on (a harness
 *                                             that checks many independent promises, like
 *                                             test_abi_conformance, reports all of them);
 *                                             it ends with `return check_report("name");`.
 *
 * Every failure is one line on stderr: "<file>:<line>: FAILED: <what>". */
#ifndef BACKUP_TEST_CHECK_H
#define BACKUP_TEST_CHECK_H
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int g_checks = 0;
static int g_failed = 0;

/* One failed check, counted and printed (printf-style arguments); the caller goes on. */
#define FAILURE(...)                                                  \
    do {                                                              \
        g_failed++;                                                   \
        fprintf(stderr, "%s:%d: FAILED: ", __FILE__, __LINE__);       \
        fprintf(stderr, __VA_ARGS__);                                 \
        fputc('\n', stderr);                                          \
    } while (0)

/* ---- not fatal: reported, counted, and the run goes on ---- */

#define EXPECT(cond, what)                           \
    do {                                             \
        g_checks++;                                  \
        if (!(cond)) FAILURE("%s (%s)", what, #cond); \
    } while (0)

/* EXPECT with a printf-style message (the values that made it fail). */
#define EXPECTF(cond, ...)               \
    do {                                 \
        g_checks++;                      \
        if (!(cond)) FAILURE(__VA_ARGS__); \
    } while (0)

#define EXPECT_INT(actual, expected, what)                                                \
    do {                                                                                  \
        long long a_ = (long long)(actual), e_ = (long long)(expected);                   \
        g_checks++;                                                                       \
        if (a_ != e_) FAILURE("%s: %s == %lld, expected %lld", what, #actual, a_, e_);     \
    } while (0)

#define EXPECT_STR(actual, expected, what)                                        \
    do {                                                                          \
        const char* a_ = (actual);                                                \
        g_checks++;                                                               \
        if (a_ == NULL || strcmp(a_, (expected)) != 0)                            \
            FAILURE("%s: \"%s\", expected \"%s\"", what, a_ ? a_ : "(null)", (expected)); \
    } while (0)

#define EXPECT_HAS(actual, needle, what)                                          \
    do {                                                                          \
        const char* a_ = (actual);                                                \
        g_checks++;                                                               \
        if (a_ == NULL || strstr(a_, (needle)) == NULL)                           \
            FAILURE("%s: \"%s\" lacks \"%s\"", what, a_ ? a_ : "(null)", (needle)); \
    } while (0)

/* ---- fatal: the first failure ends the harness ---- */

#define CHECK(cond)                         \
    do {                                    \
        g_checks++;                         \
        if (!(cond)) {                      \
            FAILURE("CHECK (%s)", #cond);   \
            exit(1);                        \
        }                                   \
    } while (0)

#define CHECK_EQ_INT(actual, expected)                                         \
    do {                                                                       \
        long long a_ = (long long)(actual), e_ = (long long)(expected);        \
        g_checks++;                                                            \
        if (a_ != e_) {                                                        \
            FAILURE("%s == %lld, expected %lld", #actual, a_, e_);             \
            exit(1);                                                           \
        }                                                                      \
    } while (0)

#define CHECK_STR_CONTAINS(haystack, needle)                                   \
    do {                                                                       \
        const char* h_ = (haystack);                                           \
        g_checks++;                                                            \
        if (h_ == NULL || strstr(h_, (needle)) == NULL) {                      \
            FAILURE("\"%s\" does not contain \"%s\"", h_ ? h_ : "(null)", (needle)); \
            exit(1);                                                           \
        }                                                                      \
    } while (0)

#define PASS(name) printf("ok - %s\n", name)

/* The last line of a harness that uses the EXPECT family, and its exit status: 0 when
 * every check held, 1 when any failed. */
static inline int check_report(const char* name) {
    if (g_failed) {
        fprintf(stderr, "%s: %d of %d checks FAILED\n", name, g_failed, g_checks);
        return 1;
    }
    printf("%s: all %d checks passed\n", name, g_checks);
    return 0;
}

#endif
