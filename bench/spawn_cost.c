/* Cost of starting N children one after the other, the way clusterctl's supervisor does
 * (fork, then wait on a close-on-exec pipe until the child's execve succeeded), compared
 * with posix_spawn (glibc: clone(CLONE_VM|CLONE_VFORK), no copy of the address space).
 *
 *   spawn_cost fork|fork-overlap|spawn N [HEAP_MIB] -- PROGRAM ARGS...
 *
 * fork-overlap forks every child first and only then waits for all their execs (the
 * pipes), so that the children's execve calls run in parallel on other CPUs.
 *
 * HEAP_MIB dirties that much heap in the parent first, to show how the fork path scales
 * with the parent's size. Prints "mode N total_ms per_child_us". All children are
 * SIGKILLed and reaped before exit. Used by bench/bench.py (section 4).
 */
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

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* Forks a child that execs argv; *errfd gets the read end of its close-on-exec pipe. */
static pid_t fork_child(char **argv, int *errfd) {
    int p[2];
    if (pipe2(p, O_CLOEXEC) != 0) return -1;
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        execvp(argv[0], argv);
        int e = errno;
        (void)!write(p[1], &e, sizeof e);
        _exit(127);
    }
    close(p[1]);
    *errfd = p[0];
    return pid;
}

/* Waits until the child behind errfd has exec'd (EOF) or failed (an errno arrives). */
static int exec_done(int errfd) {
    int e;
    ssize_t n;
    do {
        n = read(errfd, &e, sizeof e);
    } while (n < 0 && errno == EINTR);
    close(errfd);
    return n == 0;
}

static pid_t spawn_fork(char **argv) {
    int fd;
    pid_t pid = fork_child(argv, &fd);
    if (pid < 0) return -1;
    if (!exec_done(fd)) {
        waitpid(pid, NULL, 0);
        return -1;
    }
    return pid;
}

static pid_t spawn_posix(char **argv) {
    pid_t pid;
    return posix_spawnp(&pid, argv[0], NULL, NULL, argv, environ) == 0 ? pid : -1;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s fork|fork-overlap|spawn N [HEAP_MIB] -- PROGRAM ARGS...\n",
                argv[0]);
        return 2;
    }
    int fork_mode = strcmp(argv[1], "fork") == 0;
    int overlap = strcmp(argv[1], "fork-overlap") == 0;
    int n = atoi(argv[2]);
    int i = 3;
    long heap_mib = 0;
    if (strcmp(argv[i], "--") != 0) heap_mib = atol(argv[i++]);
    if (strcmp(argv[i], "--") != 0 || i + 1 >= argc || n <= 0) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    char **child_argv = &argv[i + 1];
    if (heap_mib > 0) {
        size_t len = (size_t)heap_mib << 20;
        char *mem = malloc(len);
        if (!mem) return 1;
        memset(mem, 1, len);
    }
    pid_t *pids = calloc((size_t)n, sizeof *pids);
    if (!pids) return 1;
    double t0 = now_ms();
    int started = 0;
    if (overlap) {
        int *fds = calloc((size_t)n, sizeof *fds);
        if (!fds) return 1;
        for (; started < n; started++) {
            pids[started] = fork_child(child_argv, &fds[started]);
            if (pids[started] < 0) {
                perror("fork");
                break;
            }
        }
        for (int k = 0; k < started; k++) {
            if (!exec_done(fds[k])) fprintf(stderr, "exec failed\n");
        }
        free(fds);
    } else {
        for (; started < n; started++) {
            pids[started] = fork_mode ? spawn_fork(child_argv) : spawn_posix(child_argv);
            if (pids[started] < 0) {
                perror("spawn");
                break;
            }
        }
    }
    double total = now_ms() - t0;
    for (int k = 0; k < started; k++) kill(pids[k], SIGKILL);
    for (int k = 0; k < started; k++) waitpid(pids[k], NULL, 0);
    printf("%s %d %.2f %.1f\n", overlap ? "fork-overlap" : fork_mode ? "fork" : "posix_spawn",
           started, total,
           started ? total * 1000.0 / started : 0.0);
    return started == n ? 0 : 1;
}
