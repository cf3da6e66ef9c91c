/* Minimal assertion helpers for the C harnesses: a failed check prints where and exits 1. */
#ifndef BACKUP_TEST_CHECK_H
#define BACKUP_TEST_CHECK_H
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int g_checks = 0;

#define CHECK(cond)                                                                  \
    do {                                                                             \
        g_checks++;                                                                  \
        if (!(cond)) {                                                               \
            fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            exit(1);                                                                 \
        }                                                                            \
    } while (0)

#define CHECK_EQ_INT(actual, expected)                                                   \
    do {                                                                                 \
        long long a_ = (long long)(actual), e_ = (long long)(expected);                  \
        g_checks++;                                                                      \
        if (a_ != e_) {                                                                  \
            fprintf(stderr, "%s:%d: %s == %lld, expected %lld\n", __FILE__, __LINE__,    \
                    #actual, a_, e_);                                                    \
            exit(1);                                                                     \
        }                                                                                \
    } while (0)

#define CHECK_STR_CONTAINS(haystack, needle)                                               \
    do {                                                                                   \
        const char* h_ = (haystack);                                                       \
        g_checks++;                                                                        \
        if (h_ == NULL || strstr(h_, (needle)) == NULL) {                                  \
            fprintf(stderr, "%s:%d: \"%s\" does not contain \"%s\"\n", __FILE__, __LINE__, \
                    h_ ? h_ : "(null)", (needle));                                         \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

#define PASS(name) printf("ok - %s\n", name)

#endif
