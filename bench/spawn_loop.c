/* spawn_loop.c -- the floor under bmdb.exec: spawns `true` N times with
 * posix_spawn, as host/lexec.c spawns (own process group, empty signal
 * mask, default dispositions, descriptors from 3 closed, stdio on
 * /dev/null), waits for each, and prints spawns per second. Beside
 * bench/exec_loop.lua, which makes the same spawns through bmdb.exec, it
 * shows what the call itself costs: pipes, the pidfd, the poll, the fence.
 *
 *   make build/spawn-loop && build/spawn-loop [N]   (N: 2000) */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? strtol(argv[1], NULL, 10) : 2000;
    if (n <= 0) {
        fprintf(stderr, "usage: %s [N > 0]\n", argv[0]);
        return 2;
    }
    int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
    if (devnull < 0) return perror("/dev/null"), 1;
    posix_spawn_file_actions_t fa;
    posix_spawnattr_t at;
    posix_spawn_file_actions_init(&fa);
    for (int i = 0; i < 3; i++) posix_spawn_file_actions_adddup2(&fa, devnull, i);
    posix_spawn_file_actions_addclosefrom_np(&fa, 3);
    posix_spawnattr_init(&at);
    sigset_t none, all;
    sigemptyset(&none);
    sigfillset(&all);
    posix_spawnattr_setflags(&at, POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
    posix_spawnattr_setpgroup(&at, 0);
    posix_spawnattr_setsigmask(&at, &none);
    posix_spawnattr_setsigdefault(&at, &all);
    char *child_argv[] = {"true", NULL};
    double t0 = now();
    for (long i = 0; i < n; i++) {
        pid_t pid;
        int rc = posix_spawnp(&pid, "true", &fa, &at, child_argv, environ);
        if (rc) return fprintf(stderr, "posix_spawnp true: %s\n", strerror(rc)), 1;
        int st;
        while (waitpid(pid, &st, 0) < 0)
            if (errno != EINTR) return perror("waitpid"), 1;
        if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) return fprintf(stderr, "true failed: %d\n", st), 1;
    }
    double s = now() - t0;
    printf("posix_spawn + waitpid of true: %ld spawns in %.3f s: %.0f spawns/s\n", n, s, (double)n / s);
    return 0;
}
