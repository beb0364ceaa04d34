/* qcbt backup of a local image: see local-source.h. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "chain.h"
#include "checkpoint.h"
#include "error.h"
#include "io.h"
#include "local-source.h"
#include "manifest.h"
#include "publish.h"
#include "qcbt.h"

#define SERVER_NAME "qcbt-server"
#define SOCK_NAME   "s"
#define LOG_NAME    "server.log"

struct local_source {
    char *image;   /* as given */
    char *abspath; /* realpath of the top layer */
    struct chain *chain;
    char *server; /* the qcbt-server binary */
    char dir[PATH_MAX];
    char sock[PATH_MAX];
    char log[PATH_MAX];
    char *uri;
    pid_t pid;   /* the server, until reaped */
    bool reaped; /* status is valid */
    int status;
};

/* For the signal handler: the server to kill and what to remove. */
static volatile sig_atomic_t sig_pid;
static char sig_dir[PATH_MAX], sig_sock[PATH_MAX], sig_log[PATH_MAX];
static const int stop_signals[] = {SIGINT, SIGTERM, SIGHUP};

bool
local_source_is_uri(const char *arg)
{
    const char *p = arg;

    if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z')))
        return false;
    while ((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') ||
           (*p >= '0' && *p <= '9') || *p == '+' || *p == '-' || *p == '.')
        p++;
    return strncmp(p, "://", 3) == 0;
}

int
local_source_open(const char *image, bool writable, struct local_source **out)
{
    struct chain_open_opts co = {.lock = QCBT_IO_LOCK_READ};
    struct local_source *ls;
    struct qcbt_io *io = NULL;
    char *dir_copy, *slash;
    int r;

    *out = NULL;
    ls = calloc(1, sizeof *ls);
    if (!ls || !(ls->image = strdup(image)))
        goto nomem;
    ls->pid = -1;
    ls->abspath = realpath(image, NULL);
    if (!ls->abspath) {
        r = qcbt_error(errno, "%s: %s", image, strerror(errno));
        goto fail;
    }
    r = writable ? qcbt_io_open_file_rw(image, &io)
                 : qcbt_io_open_file(image, &io);
    if (r < 0)
        goto fail;
    /* Backing files resolve against the top layer's directory. */
    dir_copy = strdup(image);
    if (!dir_copy) {
        qcbt_io_free(io);
        goto nomem;
    }
    slash = strrchr(dir_copy, '/');
    if (slash)
        slash[slash == dir_copy] = '\0';
    chain_opts_from_env(&co);
    r = chain_open_io(io, NULL, slash ? dir_copy : ".", &co, &ls->chain);
    free(dir_copy);
    if (r < 0)
        goto fail;
    *out = ls;
    return 0;

nomem:
    r = qcbt_error(ENOMEM, "out of memory");
fail:
    local_source_free(ls);
    return r;
}

int
local_source_check_new(struct local_source *ls, const char *name)
{
    char ename[256];

    /* The server publishes it as -B NAME, where '=' starts an alias. */
    if (strchr(name, '=')) {
        qcbt_escape(ename, sizeof ename, name, strlen(name));
        return qcbt_error(EINVAL,
                          "checkpoint '%s': a name with '=' cannot be "
                          "published (qcbt-server -B NAME=ALIAS)",
                          ename);
    }
    return checkpoint_check_new(ls->chain, name);
}

int
local_source_bitmap_usable(struct local_source *ls,
                           const char *name,
                           char *why,
                           size_t len,
                           void (*note)(const char *text))
{
    struct publish_spec spec = {.name = name};
    struct publish_opts po = {.mode = MERGE_TOLERANT};
    struct publish_set *set = NULL;
    char ename[256];
    size_t i;
    int r;

    why[0] = '\0';
    if (strchr(name, '=')) {
        qcbt_escape(ename, sizeof ename, name, strlen(name));
        snprintf(why,
                 len,
                 "bitmap '%s' cannot be published (a name with '=')",
                 ename);
        return 0;
    }
    r = publish_run(ls->chain, &spec, 1, &po, &set);
    if (r == -EINVAL) {
        snprintf(why, len, "%s", qcbt_error_get());
        qcbt_error_clear();
        return 0;
    }
    if (r < 0)
        return r;
    for (i = 0; i < set->nr_notices && note; i++)
        note(set->notices[i].text);
    if (set->error)
        snprintf(why, len, "%s", set->error);
    r = set->error ? 0 : 1;
    publish_set_free(set);
    return r;
}

/* ---- finding and starting qcbt-server -------------------------------- */

static bool
executable(const char *path)
{
    struct stat st;

    return stat(path, &st) == 0 && S_ISREG(st.st_mode) &&
           access(path, X_OK) == 0;
}

/* $QCBT_SERVER, else qcbt-server beside this qcbt, else ../server/ from
 * it (the build tree), else the first on PATH.
 */
static char *
find_server(void)
{
    const char *env = getenv("QCBT_SERVER");
    char self[PATH_MAX], *slash, *path, *p;
    ssize_t n;

    if (env && env[0]) {
        if (!executable(env)) {
            qcbt_error(ENOENT,
                       "$QCBT_SERVER (%s) is not an executable file",
                       env);
            return NULL;
        }
        return strdup(env);
    }
    n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n > 0) {
        self[n] = '\0';
        slash = strrchr(self, '/');
        if (slash) {
            *slash = '\0';
            if (asprintf(&p, "%s/" SERVER_NAME, self) >= 0) {
                if (executable(p))
                    return p;
                free(p);
            }
            if (asprintf(&p, "%s/../server/" SERVER_NAME, self) >= 0) {
                if (executable(p))
                    return p;
                free(p);
            }
        }
    }
    path = getenv("PATH");
    if (path && (path = strdup(path))) {
        char *save = NULL, *d;

        for (d = strtok_r(path, ":", &save); d; d = strtok_r(NULL, ":", &save))
            if (d[0] && asprintf(&p, "%s/" SERVER_NAME, d) >= 0) {
                if (executable(p)) {
                    free(path);
                    return p;
                }
                free(p);
            }
        free(path);
    }
    qcbt_error(ENOENT,
               SERVER_NAME " not found (looked for $QCBT_SERVER, beside "
                           "qcbt, and on PATH)");
    return NULL;
}

/* Kill the server, wait for it, remove the directory, and die of SIG. */
static void
on_stop_signal(int sig)
{
    pid_t pid = (pid_t)sig_pid;

    if (pid > 0) {
        kill(pid, SIGKILL);
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR)
            ;
    }
    if (sig_sock[0])
        unlink(sig_sock);
    if (sig_log[0])
        unlink(sig_log);
    if (sig_dir[0])
        rmdir(sig_dir);
    signal(sig, SIG_DFL);
    raise(sig);
}

static void
signals_install(void)
{
    struct sigaction sa = {.sa_handler = on_stop_signal};
    size_t i;

    sigemptyset(&sa.sa_mask);
    for (i = 0; i < sizeof stop_signals / sizeof *stop_signals; i++)
        sigaddset(&sa.sa_mask, stop_signals[i]);
    for (i = 0; i < sizeof stop_signals / sizeof *stop_signals; i++) {
        struct sigaction old;

        /* A signal the caller ignores (nohup) stays ignored. */
        if (sigaction(stop_signals[i], NULL, &old) == 0 &&
            old.sa_handler == SIG_IGN)
            continue;
        sigaction(stop_signals[i], &sa, NULL);
    }
}

static void
signals_block(bool block, sigset_t *old)
{
    sigset_t set;
    size_t i;

    sigemptyset(&set);
    for (i = 0; i < sizeof stop_signals / sizeof *stop_signals; i++)
        sigaddset(&set, stop_signals[i]);
    sigprocmask(block ? SIG_BLOCK : SIG_SETMASK, block ? &set : old, old);
}

/* Percent-encode PATH for the socket= query of an nbd+unix URI. */
static char *
uri_for_socket(const char *path)
{
    static const char hexd[] = "0123456789ABCDEF";
    size_t n = strlen(path), i, o = 0;
    char *u = malloc(sizeof "nbd+unix:///?socket=" + 3 * n);

    if (!u)
        return NULL;
    o = (size_t)sprintf(u, "nbd+unix:///?socket=");
    for (i = 0; i < n; i++) {
        unsigned char c = (unsigned char)path[i];

        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
            (c >= '0' && c <= '9') || strchr("-._~/", c)) {
            u[o++] = (char)c;
        } else {
            u[o++] = '%';
            u[o++] = hexd[c >> 4];
            u[o++] = hexd[c & 15];
        }
    }
    u[o] = '\0';
    return u;
}

/* Decimal digits of V into BUF (async-signal-safe, for the child). */
static void
fmt_long(char *buf, long v)
{
    char tmp[24];
    int n = 0, i = 0;

    do
        tmp[n++] = (char)('0' + v % 10);
    while ((v /= 10) > 0);
    while (n)
        buf[i++] = tmp[--n];
    buf[i] = '\0';
}

int
local_source_start(struct local_source *ls,
                   const char *bitmap,
                   unsigned connections)
{
    extern char **environ;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    const char *tmp = getenv("TMPDIR");
    char conns[16], pidvar[48], **envp = NULL, *argv[16];
    size_t nenv = 0, i, k = 0;
    int lfd = -1, logfd = -1, nullfd = -1, r;
    pid_t parent = getpid(), pid;
    sigset_t oldmask;

    ls->server = find_server();
    if (!ls->server)
        return -ENOENT;
    if (!tmp || !tmp[0])
        tmp = "/tmp";
    if ((size_t)snprintf(ls->dir,
                         sizeof ls->dir,
                         "%s/qcbt-backup.XXXXXX",
                         tmp) >= sizeof ls->dir)
        return qcbt_error(ENAMETOOLONG, "TMPDIR is too long");
    if (!mkdtemp(ls->dir)) {
        r = qcbt_error(errno, "%s: %s", ls->dir, strerror(errno));
        ls->dir[0] = '\0';
        return r;
    }
    if ((size_t)snprintf(ls->sock, sizeof ls->sock, "%s/" SOCK_NAME, ls->dir) >=
            sizeof ls->sock ||
        (size_t)snprintf(ls->log, sizeof ls->log, "%s/" LOG_NAME, ls->dir) >=
            sizeof ls->log ||
        strlen(ls->sock) >= sizeof sa.sun_path)
        return qcbt_error(ENAMETOOLONG,
                          "%s: too long for a unix socket (set TMPDIR to a "
                          "shorter directory)",
                          ls->sock);
    strcpy(sa.sun_path, ls->sock);
    ls->uri = uri_for_socket(ls->sock);
    if (!ls->uri)
        return qcbt_error(ENOMEM, "out of memory");

    /* Listening before the server starts: clients wait in the backlog. */
    lfd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0 ||
        listen(lfd, SOMAXCONN) < 0) {
        r = qcbt_error(errno, "%s: %s", ls->sock, strerror(errno));
        goto out;
    }
    logfd = open(ls->log, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    nullfd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (logfd < 0 || nullfd < 0) {
        r = qcbt_error(errno, "%s: %s", ls->log, strerror(errno));
        goto out;
    }

    /* Everything the child needs is built before fork(): after it, only
     * async-signal-safe calls.
     */
    snprintf(conns, sizeof conns, "%u", connections ? connections : 1);
    argv[k++] = ls->server;
    argv[k++] = "-f";
    argv[k++] = (char *)chain_fmt_name(ls->chain->layers[0].fmt);
    argv[k++] = "-e";
    argv[k++] = conns;
    if (bitmap) {
        argv[k++] = "-B";
        argv[k++] = (char *)bitmap;
    }
    argv[k++] = "--";
    argv[k++] = ls->image;
    argv[k] = NULL;
    while (environ[nenv])
        nenv++;
    envp = calloc(nenv + 3, sizeof *envp);
    if (!envp) {
        r = qcbt_error(ENOMEM, "out of memory");
        goto out;
    }
    for (i = 0, k = 0; i < nenv; i++)
        if (strncmp(environ[i], "LISTEN_", 7) != 0)
            envp[k++] = environ[i];
    envp[k++] = "LISTEN_FDS=1";
    envp[k++] = pidvar;
    envp[k] = NULL;

    signals_block(true, &oldmask);
    pid = fork();
    if (pid == 0) {
        /* The child: it dies with qcbt, whatever kills qcbt. */
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        if (getppid() != parent)
            _exit(127);
        sigprocmask(SIG_SETMASK, &oldmask, NULL);
        if (dup2(nullfd, 0) < 0 || dup2(logfd, 1) < 0 || dup2(logfd, 2) < 0)
            _exit(127);
        if (lfd == 3) {
            if (fcntl(3, F_SETFD, 0) < 0)
                _exit(127);
        } else if (dup2(lfd, 3) < 0) {
            _exit(127);
        }
        memcpy(pidvar, "LISTEN_PID=", 11);
        fmt_long(pidvar + 11, (long)getpid());
        execve(ls->server, argv, envp);
        _exit(127);
    }
    if (pid < 0) {
        r = qcbt_error(errno, "fork: %s", strerror(errno));
        signals_block(false, &oldmask);
        goto out;
    }
    ls->pid = pid;
    snprintf(sig_dir, sizeof sig_dir, "%s", ls->dir);
    snprintf(sig_sock, sizeof sig_sock, "%s", ls->sock);
    snprintf(sig_log, sizeof sig_log, "%s", ls->log);
    sig_pid = pid;
    signals_install();
    signals_block(false, &oldmask);
    r = 0;
out:
    /* Only the server holds the listening socket: if it dies, connecting
     * fails instead of waiting in a backlog nobody accepts.
     */
    if (lfd >= 0)
        close(lfd);
    if (logfd >= 0)
        close(logfd);
    if (nullfd >= 0)
        close(nullfd);
    free(envp);
    return r;
}

const char *
local_source_uri(const struct local_source *ls)
{
    return ls->uri;
}

const char *
local_source_image(const struct local_source *ls)
{
    return ls->image;
}

const char *
local_source_abspath(const struct local_source *ls)
{
    return ls->abspath;
}

void
local_source_kill_server(struct local_source *ls)
{
    if (ls->pid > 0 && !ls->reaped)
        kill(ls->pid, SIGKILL);
}

static void
reap(struct local_source *ls, bool block)
{
    pid_t w;

    if (ls->pid <= 0 || ls->reaped)
        return;
    do
        w = waitpid(ls->pid, &ls->status, block ? 0 : WNOHANG);
    while (w < 0 && errno == EINTR);
    if (w == ls->pid || (w < 0 && errno == ECHILD)) {
        ls->reaped = true;
        sig_pid = 0;
    }
}

void
local_source_stop(struct local_source *ls)
{
    struct timespec ts = {.tv_nsec = 10 * 1000 * 1000};
    int i;

    if (!ls || ls->pid <= 0)
        return;
    reap(ls, false);
    if (ls->reaped)
        return;
    kill(ls->pid, SIGTERM);
    /* It answers SIGTERM at once once its clients are gone; a server
     * stuck for 10 s is killed (it only ever read the image).
     */
    for (i = 0; i < 1000 && !ls->reaped; i++) {
        reap(ls, false);
        if (!ls->reaped)
            nanosleep(&ts, NULL);
    }
    if (!ls->reaped) {
        kill(ls->pid, SIGKILL);
        reap(ls, true);
    }
}

void
local_source_explain(struct local_source *ls)
{
    char msg[2048], line[512] = "", how[64];
    FILE *fp;

    if (!ls || ls->pid <= 0)
        return;
    /* A server still running ends on SIGTERM with status 0: only an
     * error exit or another signal is its own doing (one dying of
     * SIGKILL may not be reaped yet when its socket closes, hence the
     * stop and not a look).
     */
    local_source_stop(ls);
    if (!ls->reaped ||
        (WIFEXITED(ls->status) && WEXITSTATUS(ls->status) == 0) ||
        (WIFSIGNALED(ls->status) && WTERMSIG(ls->status) == SIGTERM))
        return;
    if (WIFSIGNALED(ls->status))
        snprintf(how,
                 sizeof how,
                 "was killed by signal %d",
                 WTERMSIG(ls->status));
    else
        snprintf(how,
                 sizeof how,
                 "exited with status %d",
                 WEXITSTATUS(ls->status));
    fp = fopen(ls->log, "r");
    if (fp) {
        char buf[512];

        while (fgets(buf, sizeof buf, fp))
            if (buf[0] != '\n')
                snprintf(line, sizeof line, "%s", buf);
        fclose(fp);
        line[strcspn(line, "\n")] = '\0';
    }
    snprintf(msg, sizeof msg, "%s", qcbt_error_get());
    if (line[0])
        qcbt_error(qcbt_error_errno() ? qcbt_error_errno() : EIO,
                   "%s (" SERVER_NAME " %s: %s)",
                   msg,
                   how,
                   line);
    else
        qcbt_error(qcbt_error_errno() ? qcbt_error_errno() : EIO,
                   "%s (" SERVER_NAME " %s)",
                   msg,
                   how);
}

int
local_source_create_checkpoint(struct local_source *ls, const char *name)
{
    struct chain_layer *top = &ls->chain->layers[0];
    int r;

    local_source_stop(ls);
    if (manifest_test_fault("stop-before-checkpoint"))
        raise(SIGSTOP); /* the test tries to write meanwhile */
    /* The server held the image too: only now may qcbt write it. */
    r = qcbt_io_lock(top->io, QCBT_IO_LOCK_WRITE);
    if (r < 0)
        return r;
    if (manifest_test_fault("checkpoint-eio") ||
        manifest_test_fault("checkpoint-eio-manifest"))
        return qcbt_error(EIO, "%s: %s (injected)", ls->image, strerror(EIO));
    return checkpoint_add(ls->chain, name, 0);
}

void
local_source_free(struct local_source *ls)
{
    if (!ls)
        return;
    local_source_stop(ls);
    sig_pid = 0;
    sig_dir[0] = sig_sock[0] = sig_log[0] = '\0';
    if (ls->sock[0])
        unlink(ls->sock);
    if (ls->log[0])
        unlink(ls->log);
    if (ls->dir[0])
        rmdir(ls->dir);
    chain_close(ls->chain);
    free(ls->server);
    free(ls->uri);
    free(ls->image);
    free(ls->abspath);
    free(ls);
}
