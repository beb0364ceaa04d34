/* qcbt-server: serve qcow2 chains over NBD with their persistent bitmaps,
 * merged across the chain, as qemu:dirty-bitmap:NAME meta contexts.
 */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <malloc.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "error.h"
#include "internal.h"

#ifndef QCBT_VERSION
#define QCBT_VERSION "0.1.0"
#endif

#define MAX_LISTEN 16

static struct server server = {
    .max_connections = 100,
    .threads = 4,
    .handshake_timeout = 10,
};
static volatile sig_atomic_t quit_signal;

/* The name messages start with: "qemu-nbd" when we were started under
 * that name (a symlink put first in a backup tool's PATH), and then the
 * command line means what it means to qemu-nbd (qemu_nbd_cli).
 */
static const char *progname = "qcbt-server";
static bool qemu_nbd_cli;

void
srv_log(const struct server *srv, int level, const char *fmt, ...)
{
    va_list ap;
    char buf[1024];

    if (level > srv->verbose)
        return;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fprintf(stderr, "%s: %s\n", progname, buf);
}

static void
usage(FILE *fp)
{
    fprintf(
        fp,
        "Usage: qcbt-server [OPTIONS] IMAGE\n"
        "       qcbt-server [OPTIONS] --export name=N,image=PATH[,...] ...\n"
        "\n"
        "Serve IMAGE (its whole backing chain, read-only) over NBD, with\n"
        "persistent dirty bitmaps merged across the chain published as\n"
        "qemu:dirty-bitmap:NAME meta contexts.\n"
        "\n"
        "Export:\n"
        "  -f, --format FMT          IMAGE format: qcow2 or raw (default: "
        "probe)\n"
        "  -x, --export-name NAME    export name (default \"\")\n"
        "  -D, --description TEXT    export description\n"
        "  -B, --bitmap NAME[=ALIAS] publish NAME's merged bitmap as\n"
        "                            qemu:dirty-bitmap:ALIAS (repeatable)\n"
        "      --all-bitmaps         publish every bitmap of the chain;\n"
        "                            skip (with a warning) those that "
        "cannot\n"
        "                            be merged\n"
        "      --strict              libvirt's merge rules (default: "
        "tolerant)\n"
        "  -A, --allocation-depth    publish qemu:allocation-depth\n"
        "      --export KEY=VALUE,.. another export: name=, image=, format=,\n"
        "                            description=, bitmap=NAME[=ALIAS]\n"
        "                            (repeatable), all-bitmaps=on, "
        "strict=on,\n"
        "                            allocation-depth=on, force-share=on\n"
        "                            (repeatable)\n"
        "  -U, --force-share         serve images another process writes\n"
        "                            (a running VM): their data may be\n"
        "                            inconsistent.  Default: refuse them, "
        "and\n"
        "                            keep writers out while serving\n"
        "Network:\n"
        "  -k, --socket PATH         listen on a unix socket\n"
        "  -b, --bind ADDR           listen address (default 0.0.0.0)\n"
        "  -p, --port PORT           TCP port (default 10809)\n"
        "  -e, --shared N            at most N connections (default 100)\n"
        "  -T, --threads N           requests served in parallel per\n"
        "                            connection (default 4)\n"
        "      --handshake-timeout S drop clients not in transmission "
        "after S\n"
        "                            seconds (default 10)\n"
        "      --idle-timeout S      drop clients that send no request "
        "for S\n"
        "                            seconds (default 0: never)\n"
        "Process:\n"
        "  -t, --persistent          keep running after the last client\n"
        "      --fork                return once the server is listening\n"
        "      --pid-file FILE       write the server's PID to FILE\n"
        "  -v, --verbose             log connections (twice: every "
        "option)\n"
        "  -r, --read-only           accepted; exports are always read-only\n"
        "  -h, --help | -V, --version\n"
        "qemu-nbd options (accepted; they change nothing on a read-only\n"
        "export): --detect-zeroes=off|on|unmap, --discard=ignore|unmap,\n"
        "  --cache=MODE, -n/--nocache, --aio=threads|native|io_uring,\n"
        "  --image-opts (IMAGE is driver=qcow2|raw,file.filename=PATH).\n"
        "Refused with an error: -c, -d, -L, -s, -l, -o, --tls-authz,\n"
        "  --selinux-label, and (as qemu-nbd) -T/--trace.\n"
        "\n"
        "Started under the name qemu-nbd (a symlink), qcbt-server reads a\n"
        "qemu-nbd command line: -e defaults to 1, -T is --trace, and -r is\n"
        "required (qcbt-server cannot serve a writable export).\n"
        "\n"
        "Exit status: 0 after a clean shutdown (SIGTERM, SIGINT, or the "
        "last\n"
        "client leaving without -t), 1 on any error at start.\n");
    tls_usage(fp);
}

static void die(const char *fmt, ...)
    __attribute__((format(printf, 1, 2), noreturn));

static void
die(const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "%s: ", progname);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(1);
}

/* A mistake on the command line: one line, with a pointer to --help. */
static void usage_error(const char *fmt, ...)
    __attribute__((format(printf, 1, 2), noreturn));

static void
usage_error(const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "%s: ", progname);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, " (see %s --help)\n", progname);
    exit(1);
}

/* getopt_long (with opterr = 0) returned RET, '?' or ':', for the
 * argument it just looked at: say what is wrong with it, in one line.
 */
static void
bad_option(int ret,
           char **argv,
           const struct option *opts,
           const char *shortopts)
{
    const char *arg = argv[optind - 1];
    size_t len = strcspn(arg, "=");
    bool is_long = !strncmp(arg, "--", 2) && len > 2;
    bool val_is_long = false;
    char names[256] = "";
    size_t i, nr = 0;

    for (i = 0; opts[i].name; i++)
        if (optopt && opts[i].val == optopt)
            val_is_long = true;
    if (ret == ':') {
        if (is_long && val_is_long)
            usage_error("option '%.*s' needs a value", (int)len, arg);
        usage_error("option '-%c' needs a value", optopt);
    }
    if (optopt == 0 && is_long) {
        /* Unknown, or a prefix of several long options. */
        for (i = 0; opts[i].name; i++) {
            if (!strncmp(opts[i].name, arg + 2, len - 2)) {
                size_t used = strlen(names);

                snprintf(names + used,
                         sizeof names - used,
                         "%s--%s",
                         nr++ ? ", " : "",
                         opts[i].name);
            }
        }
        if (nr > 1)
            usage_error("option '%.*s' is ambiguous (%s)",
                        (int)len,
                        arg,
                        names);
        usage_error("unrecognized option '%.*s'", (int)len, arg);
    }
    if (is_long && arg[len] == '=' && val_is_long)
        usage_error("option '%.*s' takes no value", (int)len, arg);
    if (optopt > 0 && optopt < 256 && optopt != ':' &&
        !strchr(shortopts, optopt))
        usage_error("unrecognized option '-%c'", optopt);
    usage_error("unrecognized option '%s'", arg);
}

static bool
parse_uint(const char *s, unsigned min, unsigned max, unsigned *out)
{
    char *end;
    unsigned long v;

    errno = 0;
    v = strtoul(s, &end, 10);
    if (errno || end == s || *end || v < min || v > max)
        return false;
    *out = v;
    return true;
}

static struct export *
new_export(void)
{
    struct export *e;

    e = realloc(server.exports, (server.nr_exports + 1) * sizeof *e);
    if (!e)
        die("out of memory");
    server.exports = e;
    e = &server.exports[server.nr_exports++];
    memset(e, 0, sizeof *e);
    return e;
}

static void
add_bitmap_arg(struct export *e, const char *arg)
{
    char **a = realloc(e->bitmap_args, (e->nr_bitmap_args + 1) * sizeof *a);

    if (!a || !(a[e->nr_bitmap_args] = strdup(arg)))
        die("out of memory");
    e->bitmap_args = a;
    e->nr_bitmap_args++;
}

static bool
parse_on(const char *what, const char *key, const char *v)
{
    if (!strcmp(v, "on") || !strcmp(v, "true") || !strcmp(v, "1") ||
        !strcmp(v, "yes"))
        return true;
    if (!strcmp(v, "off") || !strcmp(v, "false") || !strcmp(v, "0") ||
        !strcmp(v, "no"))
        return false;
    usage_error("%s: %s=%s: expected on or off", what, key, v);
}

/* --export name=N,image=PATH,bitmap=X[=ALIAS],... */
static void
parse_export(const char *spec)
{
    struct export *e = new_export();
    char *copy = strdup(spec), *save = NULL, *item;
    bool have_name = false;

    if (!copy)
        die("out of memory");
    for (item = strtok_r(copy, ",", &save); item;
         item = strtok_r(NULL, ",", &save)) {
        char *v = strchr(item, '=');

        if (!v)
            usage_error("--export: '%s' is not KEY=VALUE", item);
        *v++ = '\0';
        if (!strcmp(item, "name")) {
            e->name = strdup(v);
            have_name = true;
        } else if (!strcmp(item, "image")) {
            e->image = strdup(v);
        } else if (!strcmp(item, "format")) {
            e->format = strdup(v);
        } else if (!strcmp(item, "description")) {
            e->description = strdup(v);
        } else if (!strcmp(item, "bitmap")) {
            add_bitmap_arg(e, v);
        } else if (!strcmp(item, "all-bitmaps")) {
            e->all_bitmaps = parse_on("--export", item, v);
        } else if (!strcmp(item, "strict")) {
            e->strict = parse_on("--export", item, v);
        } else if (!strcmp(item, "allocation-depth")) {
            e->alloc_depth = parse_on("--export", item, v);
        } else if (!strcmp(item, "force-share")) {
            e->force_share = parse_on("--export", item, v);
        } else {
            usage_error("--export: unknown key '%s'", item);
        }
    }
    free(copy);
    if (!have_name || !e->image)
        usage_error("--export: name= and image= are required");
}

/* A qemu-nbd option that qcbt-server cannot honour: one line naming it. */
static void refuse(const char *option, const char *why)
    __attribute__((noreturn));

static void
refuse(const char *option, const char *why)
{
    die("option %s is not supported: %s", option, why);
}

/* ARG must be one of the WORDS (NULL-terminated), as qemu-nbd spells the
 * values of OPTION.
 */
static const char *
one_of(const char *option, const char *arg, const char *const *words)
{
    size_t i;

    for (i = 0; words[i]; i++)
        if (!strcmp(arg, words[i]))
            return words[i];
    usage_error("invalid %s '%s'", option, arg);
}

/* --image-opts: IMAGE is an option string as qemu-nbd takes it, e.g.
 * driver=qcow2,file.driver=file,file.filename=PATH.  The keys that name a
 * local file and its format are understood; any other is an error.
 */
static void
parse_image_opts(struct export *e, const char *spec)
{
    char *copy = strdup(spec), *save = NULL, *item;
    const char *driver = NULL;
    char *path = NULL;

    if (!copy)
        die("out of memory");
    for (item = strtok_r(copy, ",", &save); item;
         item = strtok_r(NULL, ",", &save)) {
        char *v = strchr(item, '=');

        if (!v)
            usage_error("--image-opts: '%s' is not KEY=VALUE", item);
        *v++ = '\0';
        if (!strcmp(item, "driver")) {
            static const char *const drivers[] = {"qcow2", "raw", "file", NULL};
            driver = one_of("--image-opts driver", v, drivers);
        } else if (!strcmp(item, "file.filename") ||
                   !strcmp(item, "filename") || !strcmp(item, "file")) {
            free(path);
            if (!(path = strdup(v)))
                die("out of memory");
        } else if (!strcmp(item, "file.driver")) {
            if (strcmp(v, "file"))
                usage_error("--image-opts: file.driver=%s: only local files "
                            "(file) are supported",
                            v);
        } else if (!strcmp(item, "read-only")) {
            if (!parse_on("--image-opts", item, v))
                refuse("--image-opts read-only=off",
                       "qcbt-server serves read-only");
        } else {
            usage_error("--image-opts: unsupported key '%s'", item);
        }
    }
    free(copy);
    if (!driver || !path)
        usage_error("--image-opts: driver= and file.filename= are required");
    /* driver=file is the bytes of the file: raw. */
    e->format = strcmp(driver, "qcow2") ? "raw" : "qcow2";
    e->image = path;
}

static void
on_signal(int sig)
{
    char b = 's';
    ssize_t ignored;

    quit_signal = sig;
    ignored = write(server.wake_pipe[1], &b, 1);
    (void)ignored;
}

static int
listen_unix(const char *path)
{
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    struct stat st;
    int fd;

    if (strlen(path) >= sizeof sun.sun_path)
        die("socket path too long: %s", path);
    strcpy(sun.sun_path, path);
    /* A stale socket from an earlier run is replaced; anything else is
     * an error.
     */
    if (lstat(path, &st) == 0) {
        if (!S_ISSOCK(st.st_mode))
            die("%s exists and is not a socket", path);
        unlink(path);
    }
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sun, sizeof sun) < 0 ||
        listen(fd, SOMAXCONN) < 0)
        die("%s: %s", path, strerror(errno));
    return fd;
}

static size_t
listen_tcp(const char *addr, const char *port, int *fds)
{
    struct addrinfo hints = {.ai_flags = AI_PASSIVE | AI_ADDRCONFIG,
                             .ai_socktype = SOCK_STREAM};
    struct addrinfo *res, *a;
    size_t n = 0;
    int r, one = 1;

    r = getaddrinfo(addr, port, &hints, &res);
    if (r != 0)
        die("%s:%s: %s", addr ? addr : "*", port, gai_strerror(r));
    for (a = res; a && n < MAX_LISTEN; a = a->ai_next) {
        int fd =
            socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);

        if (fd < 0)
            continue;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (a->ai_family == AF_INET6)
            setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof one);
        if (bind(fd, a->ai_addr, a->ai_addrlen) < 0 ||
            listen(fd, SOMAXCONN) < 0) {
            r = errno;
            close(fd);
            freeaddrinfo(res);
            die("%s:%s: %s", addr ? addr : "*", port, strerror(r));
        }
        fds[n++] = fd;
    }
    freeaddrinfo(res);
    if (n == 0)
        die("%s:%s: no address to listen on", addr ? addr : "*", port);
    return n;
}

/* Socket activation, as systemd starts services (sd_listen_fds(3)) and as
 * qemu-nbd and nbdkit take it: when LISTEN_PID is this process, LISTEN_FDS
 * listening sockets are inherited from descriptor 3 on.  Returns how many
 * (0: not activated).  The variables are removed so that they cannot be
 * taken by a process started later.
 */
#define QCBT_LISTEN_FDS_START 3

static size_t nr_activated;

static size_t
listen_activated(int *fds)
{
    const char *pid_s = getenv("LISTEN_PID");
    const char *fds_s = getenv("LISTEN_FDS");
    char *end;
    long pid, n;
    size_t i;

    if (!pid_s || !fds_s)
        return 0;
    errno = 0;
    pid = strtol(pid_s, &end, 10);
    if (errno || end == pid_s || *end || pid != (long)getpid())
        return 0; /* meant for another process */
    errno = 0;
    n = strtol(fds_s, &end, 10);
    if (errno || end == fds_s || *end || n < 0 || n > MAX_LISTEN)
        die("socket activation: LISTEN_FDS=%s: expected 0..%d",
            fds_s,
            MAX_LISTEN);
    unsetenv("LISTEN_PID");
    unsetenv("LISTEN_FDS");
    unsetenv("LISTEN_FDNAMES");
    for (i = 0; i < (size_t)n; i++) {
        int fd = QCBT_LISTEN_FDS_START + (int)i, listening = 0;
        socklen_t len = sizeof listening;

        if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) < 0)
            die("socket activation: descriptor %d is not a listening "
                "socket: %s",
                fd,
                strerror(errno));
        if (!listening)
            die("socket activation: descriptor %d is not a listening socket",
                fd);
        if (fcntl(fd, F_SETFD, FD_CLOEXEC) < 0)
            die("socket activation: descriptor %d: %s", fd, strerror(errno));
        fds[i] = fd;
    }
    nr_activated = (size_t)n;
    return nr_activated;
}

static void
accept_one(int lfd)
{
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    struct connection *c;
    pthread_attr_t attr;
    pthread_t th;
    int fd, one = 1;
    struct timeval tv = {.tv_sec = 120};
    int sndbuf = 4 << 20;

    fd = accept4(lfd, (struct sockaddr *)&ss, &sl, SOCK_CLOEXEC);
    if (fd < 0) {
        if (errno == EMFILE || errno == ENFILE) {
            /* The connection stays queued and poll() reports it again at
             * once: back off instead of spinning, and log once a second.
             */
            static int64_t last_log = -1000;
            int64_t now = now_ms();

            if (now - last_log >= 1000) {
                srv_log(&server, LOG_ERROR, "accept: %s", strerror(errno));
                last_log = now;
            }
            usleep(100000);
        }
        return;
    }
    if (atomic_load(&server.nr_connections) >= server.max_connections) {
        srv_log(&server,
                LOG_INFO,
                "connection refused: limit of %u "
                "reached",
                server.max_connections);
        close(fd);
        return;
    }
    if (ss.ss_family != AF_UNIX)
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
    /* A client that stops reading its replies cannot hold a worker
     * forever.
     */
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    /* Room for a whole data chunk: fewer wakeups per reply. */
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);

    c = calloc(1, sizeof *c);
    if (!c) {
        close(fd);
        return;
    }
    c->srv = &server;
    c->fd = fd;
    if (ss.ss_family == AF_UNIX) {
        snprintf(c->peer, sizeof c->peer, "unix:%d", fd);
    } else {
        char host[48], serv[8];

        if (getnameinfo((struct sockaddr *)&ss,
                        sl,
                        host,
                        sizeof host,
                        serv,
                        sizeof serv,
                        NI_NUMERICHOST | NI_NUMERICSERV) == 0)
            snprintf(c->peer, sizeof c->peer, "%s:%s", host, serv);
        else
            snprintf(c->peer, sizeof c->peer, "tcp:%d", fd);
    }
    pthread_mutex_init(&c->read_lock, NULL);
    pthread_mutex_init(&c->write_lock, NULL);

    pthread_mutex_lock(&server.lock);
    atomic_fetch_add(&server.nr_connections, 1);
    c->next = server.conns;
    server.conns = c;
    pthread_mutex_unlock(&server.lock);

    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    if (pthread_create(&th, &attr, connection_thread, c) != 0) {
        srv_log(&server, LOG_ERROR, "cannot start a connection thread");
        pthread_mutex_lock(&server.lock);
        server.conns = c->next;
        atomic_fetch_sub(&server.nr_connections, 1);
        pthread_mutex_unlock(&server.lock);
        close(fd);
        free(c);
    }
    pthread_attr_destroy(&attr);
}

int
main(int argc, char **argv)
{
    enum {
        OPT_ALL = 256,
        OPT_STRICT,
        OPT_EXPORT,
        OPT_FORK,
        OPT_PIDFILE,
        OPT_HSTIMEOUT,
        OPT_IDLETIMEOUT,
        OPT_DETECT_ZEROES,
        OPT_DISCARD,
        OPT_CACHE,
        OPT_AIO,
        OPT_IMAGE_OPTS,
        OPT_TLS_AUTHZ,
        OPT_SELINUX,
        OPT_TRACE,
        OPT_THREADS,
    };
    static const struct option opts[] = {
        {"format", required_argument, NULL, 'f'},
        {"export-name", required_argument, NULL, 'x'},
        {"description", required_argument, NULL, 'D'},
        {"bitmap", required_argument, NULL, 'B'},
        {"all-bitmaps", no_argument, NULL, OPT_ALL},
        {"strict", no_argument, NULL, OPT_STRICT},
        {"allocation-depth", no_argument, NULL, 'A'},
        {"export", required_argument, NULL, OPT_EXPORT},
        {"socket", required_argument, NULL, 'k'},
        {"bind", required_argument, NULL, 'b'},
        {"port", required_argument, NULL, 'p'},
        {"shared", required_argument, NULL, 'e'},
        {"threads", required_argument, NULL, OPT_THREADS},
        {"handshake-timeout", required_argument, NULL, OPT_HSTIMEOUT},
        {"idle-timeout", required_argument, NULL, OPT_IDLETIMEOUT},
        {"persistent", no_argument, NULL, 't'},
        {"fork", no_argument, NULL, OPT_FORK},
        {"pid-file", required_argument, NULL, OPT_PIDFILE},
        {"verbose", no_argument, NULL, 'v'},
        {"read-only", no_argument, NULL, 'r'},
        {"detect-zeroes", required_argument, NULL, OPT_DETECT_ZEROES},
        {"discard", required_argument, NULL, OPT_DISCARD},
        {"cache", required_argument, NULL, OPT_CACHE},
        {"nocache", no_argument, NULL, 'n'},
        {"aio", required_argument, NULL, OPT_AIO},
        {"image-opts", no_argument, NULL, OPT_IMAGE_OPTS},
        {"tls-authz", required_argument, NULL, OPT_TLS_AUTHZ},
        {"selinux-label", required_argument, NULL, OPT_SELINUX},
        {"trace", required_argument, NULL, OPT_TRACE},
        {"offset", required_argument, NULL, 'o'},
        {"connect", required_argument, NULL, 'c'},
        {"disconnect", no_argument, NULL, 'd'},
        {"list", no_argument, NULL, 'L'},
        {"snapshot", no_argument, NULL, 's'},
        {"load-snapshot", required_argument, NULL, 'l'},
        {"force-share", no_argument, NULL, 'U'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        TLS_LONG_OPTIONS,
        {NULL, 0, NULL, 0},
    };
    static const char shortopts[] = ":f:x:D:B:Ak:b:p:e:T:tvrUhVno:c:dLsl:";
    static const char *const detect_zeroes_modes[] = {"off",
                                                      "on",
                                                      "unmap",
                                                      NULL};
    static const char *const discard_modes[] = {"ignore",
                                                "off",
                                                "unmap",
                                                "on",
                                                NULL};
    static const char *const cache_modes[] = {"none",
                                              "off",
                                              "writeback",
                                              "writethrough",
                                              "directsync",
                                              "unsafe",
                                              NULL};
    static const char *const aio_modes[] = {"threads",
                                            "native",
                                            "io_uring",
                                            NULL};
    const char *detect_zeroes = "off", *discard = "ignore", *cache = NULL;
    const char *aio = "threads";
    bool image_opts = false, read_only = false;
    struct export main_exp = {0};
    struct tls_options tls_opts = {0};
    const char *sock = NULL, *bind_addr = NULL, *port = "10809";
    const char *pid_file = NULL;
    bool do_fork = false, have_main = false, force_share = false;
    int lfds[MAX_LISTEN];
    size_t nl = 0, i;
    int opt, ready_pipe[2] = {-1, -1};
    struct sigaction sa;
    unsigned v;

    /* Buffers of 128 KiB and more (worker buffers, decompressed
     * clusters) get their own mappings, so freeing them (after a large
     * request, when a worker goes idle) gives the memory back to the
     * system.  Setting the threshold stops glibc from raising it to the
     * size of the last buffer freed and keeping such buffers in its heaps.
     */
    mallopt(M_MMAP_THRESHOLD, 128 * 1024);
    server.debug = getenv("QCBT_DEBUG") != NULL;

    {
        const char *base = strrchr(argv[0], '/');

        base = base ? base + 1 : argv[0];
        if (!strcmp(base, "qemu-nbd")) {
            qemu_nbd_cli = true;
            progname = "qemu-nbd";
            server.max_connections = 1; /* qemu-nbd's default -e */
        }
    }
    main_exp.name = "";
    opterr = 0; /* our messages: one line each */
    while ((opt = getopt_long(argc, argv, shortopts, opts, NULL)) != -1) {
        switch (opt) {
        case 'f':
            main_exp.format = optarg;
            break;
        case 'x':
            main_exp.name = optarg;
            break;
        case 'D':
            main_exp.description = optarg;
            break;
        case 'B':
            add_bitmap_arg(&main_exp, optarg);
            break;
        case OPT_ALL:
            main_exp.all_bitmaps = true;
            break;
        case OPT_STRICT:
            main_exp.strict = true;
            break;
        case 'A':
            main_exp.alloc_depth = true;
            break;
        case OPT_EXPORT:
            parse_export(optarg);
            break;
        case 'k':
            sock = optarg;
            break;
        case 'b':
            bind_addr = optarg;
            break;
        case 'p':
            if (!parse_uint(optarg, 1, 65535, &v))
                usage_error("invalid --port '%s' (1..65535)", optarg);
            port = optarg;
            break;
        case 'e':
            if (!parse_uint(optarg, 1, 65536, &server.max_connections))
                usage_error("invalid --shared '%s' (1..65536)", optarg);
            break;
        case 'T':
            if (qemu_nbd_cli)
                refuse("-T/--trace", "qcbt-server has no QEMU trace events");
            /* fall through */
        case OPT_THREADS:
            if (!parse_uint(optarg, 1, 64, &server.threads))
                usage_error("invalid --threads '%s' (1..64)", optarg);
            break;
        case OPT_HSTIMEOUT:
            if (!parse_uint(optarg, 1, 3600, &server.handshake_timeout))
                usage_error("invalid --handshake-timeout '%s' (1..3600)",
                            optarg);
            break;
        case OPT_IDLETIMEOUT:
            if (!parse_uint(optarg, 0, 86400, &server.idle_timeout))
                usage_error("invalid --idle-timeout '%s' (0..86400)", optarg);
            break;
        case 't':
            server.persistent = true;
            break;
        case OPT_FORK:
            do_fork = true;
            break;
        case OPT_PIDFILE:
            pid_file = optarg;
            break;
        case 'v':
            server.verbose++;
            break;
        case 'r':
            read_only = true;
            break;
        case OPT_DETECT_ZEROES:
            /* Zeroes are found from the image's metadata and reported as
             * holes either way: nothing to detect on a read-only export.
             */
            detect_zeroes =
                one_of("--detect-zeroes", optarg, detect_zeroes_modes);
            break;
        case OPT_DISCARD:
            discard = one_of("--discard", optarg, discard_modes);
            break;
        case OPT_CACHE:
            cache = one_of("--cache", optarg, cache_modes);
            break;
        case 'n':
            cache = "none";
            break;
        case OPT_AIO:
            aio = one_of("--aio", optarg, aio_modes);
            break;
        case OPT_IMAGE_OPTS:
            image_opts = true;
            break;
        case OPT_TLS_AUTHZ:
            refuse("--tls-authz", "authorization objects are not supported");
        case OPT_SELINUX:
            refuse("--selinux-label", "sockets are not labelled");
        case OPT_TRACE:
            refuse("--trace", "qcbt-server has no QEMU trace events");
        case 'o':
            refuse("-o/--offset", "exports start at the image's offset 0");
        case 'c':
            refuse("-c/--connect",
                   "qcbt-server does not attach kernel NBD devices");
        case 'd':
            refuse("-d/--disconnect",
                   "qcbt-server does not attach kernel NBD devices");
        case 'L':
            refuse("-L/--list",
                   "qcbt-server is not an NBD client (use nbdinfo --list)");
        case 's':
            refuse("-s/--snapshot",
                   "qcbt-server serves read-only and writes no overlay");
        case 'l':
            refuse("-l/--load-snapshot", "internal snapshots are not read");
        case 'U':
            force_share = true;
            break;
        case 'h':
            usage(stdout);
            return 0;
        case 'V':
            printf("qcbt-server %s%s\n",
                   QCBT_VERSION,
                   qemu_nbd_cli ? " (started as qemu-nbd)" : "");
            return 0;
        default:
            if (opt >= TLS_OPT_MODE && opt <= TLS_OPT_LAST) {
                if (tls_option(&tls_opts, opt, optarg) < 0)
                    usage_error("%s", qcbt_error_get());
                break;
            }
            bad_option(opt, argv, opts, shortopts);
        }
    }
    if (optind < argc - 1)
        usage_error("expected one IMAGE, got '%s' and '%s'",
                    argv[optind],
                    argv[optind + 1]);
    /* qemu-nbd's own checks, in its words. */
    if (!strcmp(detect_zeroes, "unmap") && strcmp(discard, "unmap") &&
        strcmp(discard, "on"))
        usage_error("--detect-zeroes=unmap requires --discard=unmap");
    if (!strcmp(aio, "native") &&
        !(cache && (!strcmp(cache, "none") || !strcmp(cache, "off") ||
                    !strcmp(cache, "directsync"))))
        usage_error("--aio=native requires --cache=none or directsync (as "
                    "qemu-nbd: aio=native needs cache.direct=on)");
    if (image_opts && main_exp.format)
        usage_error("--image-opts and --format are mutually exclusive");
    if (qemu_nbd_cli && !read_only)
        die("a writable export is not supported (qcbt-server serves "
            "read-only): pass -r/--read-only");
    if (optind == argc - 1) {
        struct export *e = new_export();

        main_exp.image = argv[optind];
        if (image_opts)
            parse_image_opts(&main_exp, argv[optind]);
        *e = main_exp;
        have_main = true;
    } else if (main_exp.nr_bitmap_args || main_exp.format || image_opts) {
        usage_error("-B/-f apply to IMAGE, which is missing");
    }
    if (server.nr_exports == 0)
        usage_error("nothing to serve: give an IMAGE or --export");
    (void)have_main;
    if (force_share)
        for (i = 0; i < server.nr_exports; i++)
            server.exports[i].force_share = true;
    for (i = 0; i < server.nr_exports; i++) {
        size_t j;

        for (j = 0; j < i; j++)
            if (!strcmp(server.exports[i].name, server.exports[j].name))
                usage_error("export name '%s' used twice",
                            server.exports[i].name);
        if (strlen(server.exports[i].name) > 4096)
            usage_error("export name too long");
    }

    /* Certificates and keys are loaded now: a mistake is an error at
     * start, not a failed client.
     */
    if (tls_server_new(&tls_opts, &server.tls_mode, &server.tls) < 0)
        die("%s", qcbt_error_get());
    tls_options_free(&tls_opts);

    /* Build every export (chain, merged bitmaps) before listening: a
     * bitmap that cannot be merged is an error now, not for a client.
     */
    for (i = 0; i < server.nr_exports; i++)
        if (export_open(&server.exports[i], server.verbose) < 0)
            die("%s", qcbt_error_get());

    if (pipe2(server.wake_pipe, O_CLOEXEC) < 0)
        die("pipe: %s", strerror(errno));
    pthread_mutex_init(&server.lock, NULL);
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_IGN;
    sigaction(SIGPIPE, &sa, NULL);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);

    nl = listen_activated(lfds);
    if (nl > 0) {
        if (sock || bind_addr)
            srv_log(&server,
                    LOG_ERROR,
                    "socket activation: -k/-b/-p are ignored, serving "
                    "the inherited sockets");
        sock = NULL; /* not ours to unlink at exit */
    } else if (sock) {
        lfds[nl++] = listen_unix(sock);
    } else {
        nl = listen_tcp(bind_addr, port, lfds);
    }

    if (do_fork) {
        pid_t pid;
        char b;

        if (pipe(ready_pipe) < 0)
            die("pipe: %s", strerror(errno));
        pid = fork();
        if (pid < 0)
            die("fork: %s", strerror(errno));
        if (pid > 0) {
            /* Parent: return once the child is serving. */
            close(ready_pipe[1]);
            if (read(ready_pipe[0], &b, 1) != 1)
                _exit(1);
            _exit(0);
        }
        close(ready_pipe[0]);
        setsid();
        {
            int nul = open("/dev/null", O_RDWR);
            if (nul >= 0) {
                dup2(nul, 0);
                dup2(nul, 1);
                if (nul > 2)
                    close(nul);
            }
        }
    }
    if (pid_file) {
        FILE *fp = fopen(pid_file, "w");

        if (!fp || fprintf(fp, "%ld\n", (long)getpid()) < 0 || fclose(fp))
            die("%s: %s", pid_file, strerror(errno));
    }
    if (do_fork) {
        char b = 'r';
        ssize_t ignored = write(ready_pipe[1], &b, 1);
        (void)ignored;
        close(ready_pipe[1]);
    }
    if (nr_activated)
        srv_log(&server,
                LOG_INFO,
                "listening on %zu inherited socket(s)",
                nr_activated);
    else
        srv_log(&server,
                LOG_INFO,
                "listening on %s%s%s",
                sock ? sock : "port ",
                sock ? "" : port,
                "");

    for (;;) {
        struct pollfd pfds[MAX_LISTEN + 1];

        for (i = 0; i < nl; i++)
            pfds[i] = (struct pollfd){.fd = lfds[i], .events = POLLIN};
        pfds[nl] = (struct pollfd){.fd = server.wake_pipe[0], .events = POLLIN};
        if (poll(pfds, nl + 1, -1) < 0 && errno != EINTR)
            break;
        if (quit_signal)
            break;
        if (pfds[nl].revents) {
            char b[64];
            ssize_t ignored = read(server.wake_pipe[0], b, sizeof b);
            (void)ignored;
            pthread_mutex_lock(&server.lock);
            bool done = !server.persistent && server.served &&
                        atomic_load(&server.nr_connections) == 0;
            pthread_mutex_unlock(&server.lock);
            if (done)
                break;
        }
        for (i = 0; i < nl; i++)
            if (pfds[i].revents & POLLIN)
                accept_one(lfds[i]);
    }

    /* Shutdown: stop listening, stop reading requests; requests already
     * read finish and are answered.
     */
    if (quit_signal)
        srv_log(&server,
                LOG_INFO,
                "signal %d: shutting down",
                (int)quit_signal);
    atomic_store(&server.shutting_down, true);
    for (i = 0; i < nl; i++)
        close(lfds[i]);
    if (sock)
        unlink(sock);
    {
        int64_t deadline = now_ms() + 30000;

        for (;;) {
            struct connection *c;

            pthread_mutex_lock(&server.lock);
            for (c = server.conns; c; c = c->next)
                shutdown(c->fd, SHUT_RD);
            pthread_mutex_unlock(&server.lock);
            if (atomic_load(&server.nr_connections) == 0 || now_ms() > deadline)
                break;
            usleep(10000);
        }
    }
    if (atomic_load(&server.nr_connections) == 0)
        for (i = 0; i < server.nr_exports; i++)
            export_close(&server.exports[i]);
    if (atomic_load(&server.nr_connections) == 0)
        tls_server_free(server.tls);
    if (pid_file)
        unlink(pid_file);
    return 0;
}
