/* curl_loop.c -- the baseline of the HTTP client benchmark: one libcurl
 * easy handle doing N GETs of one URL back to back, on one keep-alive
 * connection (the easy handle keeps it between transfers), the body
 * discarded. Prints one line: requests, seconds, requests/s. Exits 1 if a
 * transfer fails or answers other than 2xx.
 *
 *   curl-loop URL N */
#define _GNU_SOURCE
#include <curl/curl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static size_t discard(char *p, size_t size, size_t n, void *ud)
{
    (void)p;
    (void)ud;
    return size * n;
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: curl-loop URL N\n");
        return 2;
    }
    char *end;
    long n = strtol(argv[2], &end, 10);
    if (*end || n <= 0) {
        fprintf(stderr, "curl-loop: N must be a positive number\n");
        return 2;
    }
    if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) return 1;
    CURL *h = curl_easy_init();
    if (!h) return 1;
    curl_easy_setopt(h, CURLOPT_URL, argv[1]);
    curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, discard);
    curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(h, CURLOPT_TIMEOUT, 10L);
    double t0 = now();
    for (long i = 0; i < n; i++) {
        CURLcode rc = curl_easy_perform(h);
        long status = 0;
        curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &status);
        if (rc != CURLE_OK || status < 200 || status > 299) {
            fprintf(stderr, "curl-loop: request %ld: %s (status %ld)\n", i + 1, curl_easy_strerror(rc), status);
            return 1;
        }
    }
    double s = now() - t0;
    printf("%ld requests in %.3f s: %.0f requests/s\n", n, s, n / s);
    curl_easy_cleanup(h);
    curl_global_cleanup();
    return 0;
}
