/*
 * torpor-agent: the guest half of the torpor host <-> guest protocol.
 *
 * Role
 *   Inside a torpor microVM this program is PID 1. It mounts the kernel
 *   filesystems, loads the modules the initramfs lists, mounts the image's root
 *   disk and switches into it, configures the network, and then serves the host
 *   on the virtio-serial port named "torpor.ctl". Started as any other PID
 *   (`torpor-agent --fd N`) it skips all of that and serves an inherited
 *   descriptor as the current user (as a child subreaper, so orphans come to
 *   it as they would to PID 1); that is how the test-suite drives it.
 *   docs/protocol.md defines the wire format; this file implements it.
 *
 * Design
 *   One thread and one poll() loop over the control fd, a signalfd for SIGCHLD
 *   and the stdout/stderr/stdin pipes of every running EXEC. Frames to the host
 *   are written synchronously (waiting for POLLOUT on EAGAIN) so they leave in
 *   the order they were produced. File requests run to completion inside the
 *   loop: they touch regular files and directories only, which do not block for
 *   long, and this keeps the loop free of per-transfer state.
 *
 *   Output is coalesced, Nagle-style: every frame costs the guest a
 *   virtio-serial kick (a VM exit, slow under emulation), and tools such as
 *   busybox write 4 KiB at a time. Bytes read from an EXEC's stdout/stderr
 *   pipe wait in that stream's buffer (at most OUT_CHUNK) and are sent when the
 *   buffer reaches FLUSH_THRESHOLD; when FLUSH_DELAY_MS have passed since its
 *   oldest unsent byte arrived (the loop's ppoll() timeout is the earliest such
 *   deadline, on CLOCK_MONOTONIC); when the pipe reaches EOF; when the other
 *   stream of the same EXEC produces output (so the two keep the order in which
 *   the agent read them); and before EXIT.
 *
 * Invariants
 *   - PID 1 never exits: a fatal error powers the VM off.
 *   - Every descriptor the agent opens is close-on-exec and fds 0-2 are always
 *     open, so a child sees exactly its three pipes (or /dev/null).
 *   - EXIT for an EXEC is sent once its main process has been reaped and what
 *     its pipes held at that moment has been forwarded; nothing follows it.
 *   - Output waits at most FLUSH_DELAY_MS (plus the loop's latency) in the
 *     agent, and at most OUT_CHUNK bytes per stream: memory stays bounded.
 *   - No frame is dropped while the host is connected. While it is not, output
 *     is discarded and children keep running (init mode only; in host mode the
 *     agent exits on EOF, leaving its children alone).
 *   - A reply never shares an id with another live request: a new request
 *     whose id belongs to a running EXEC or WRITE_FILE is refused (EBUSY).
 *   - A child's stdin is never written blocking: bytes the pipe cannot take are
 *     buffered. Beyond STDIN_HIGH_WATER buffered bytes in total the agent stops
 *     reading the control port until children catch up, so memory stays bounded.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <arpa/inet.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/utsname.h>
#include <sys/wait.h>

#ifndef AGENT_VERSION
#define AGENT_VERSION "0.1.0"
#endif

/* musl ships no <linux/random.h>; these values are the kernel ABI. */
#ifndef RNDADDENTROPY
#define RNDADDENTROPY _IOW('R', 0x03, int[2])
#endif
#ifndef RNDRESEEDCRNG
#define RNDRESEEDCRNG _IO('R', 0x07)
#endif

/* ---- wire format (docs/protocol.md) ------------------------------------ */

#define PROTOCOL_VERSION 1
#define MAGIC_LO 0x54 /* 0x7054 little-endian */
#define MAGIC_HI 0x70
#define HDR_LEN 12
#define MAX_PAYLOAD (1u << 20)
#define OUT_CHUNK (64u * 1024) /* largest STDOUT/STDERR/DATA payload we send */
#define EXEC_FLAG_STDIN 1u
#define EXEC_FLAG_TTY 2u /* a new pseudo-terminal; u32 cols, u32 rows follow env */
#define TTY_MAX 4096     /* cols and rows are 1..TTY_MAX */

enum {
	T_HELLO = 0x01, T_EXEC = 0x02, T_STDIN = 0x03, T_SIGNAL = 0x04,
	T_READ_FILE = 0x05, T_WRITE_FILE = 0x06, T_STAT = 0x07, T_LIST_DIR = 0x08,
	T_MKDIR = 0x09, T_SYMLINK = 0x0A, T_SET_TIME = 0x0B, T_SYNC = 0x0C,
	T_SHUTDOWN = 0x0D, T_ADD_ENTROPY = 0x0E, T_RESIZE = 0x0F, T_SET_IDENTITY = 0x10,
	T_HELLO_OK = 0x80, T_STARTED = 0x81, T_STDOUT = 0x82, T_STDERR = 0x83,
	T_EXIT = 0x84, T_DATA = 0x85, T_FILEINFO = 0x86, T_DIRENT = 0x87,
	T_OK = 0x8E, T_ERROR = 0x8F,
};

/* ---- limits ------------------------------------------------------------ */

#define MAX_EXECS 128   /* x 4 fds each stays well below RLIMIT_NOFILE 1024 */
#define MAX_UPLOADS 32
#define STDIN_HIGH_WATER (8u << 20)
#define IN_CAP (HDR_LEN + MAX_PAYLOAD) /* one whole frame always fits */
#define WBUF_CAP (16 * 1024)          /* structured replies; strings are clipped */
#define STATUS_MAX 600                /* child start-up failure record */
/* Output coalescing (see Design): a stream's buffered output is sent once it
 * reaches FLUSH_THRESHOLD bytes or its oldest byte is FLUSH_DELAY_MS old. The
 * delay is what interactive output may lag by; the threshold stays below
 * OUT_CHUNK so the read that crosses it still has room for a whole pipe's worth. */
#define FLUSH_DELAY_MS 2
#define FLUSH_THRESHOLD (32u * 1024)
/* On a TTY, a small read into an empty buffer is sent at once (no FLUSH_DELAY_MS). */
#define TTY_ECHO_MAX 256

/* ---- state ------------------------------------------------------------- */

/* One output pipe of an EXEC and the bytes read from it but not yet sent. */
struct out_stream {
	int fd;             /* our read end; -1 once closed */
	uint8_t type;       /* T_STDOUT or T_STDERR */
	unsigned char *buf; /* OUT_CHUNK bytes, allocated on first output */
	size_t len;         /* unsent bytes in buf */
	int64_t due_ns;     /* CLOCK_MONOTONIC deadline for them; valid while len > 0 */
};

enum { PIPE_OUT, PIPE_ERR, PIPE_IN }; /* out[] indices, then the stdin pipe */

struct exec_proc {
	uint32_t id;
	pid_t pid;
	struct out_stream out[2]; /* [PIPE_OUT] stdout, [PIPE_ERR] stderr */
	int in_fd;          /* our write end; -1 if not piped or closed */
	int status_fd;      /* CLOEXEC pipe: child start-up failure record */
	unsigned char *in_buf; /* stdin bytes the pipe has not taken yet */
	size_t in_off, in_len, in_cap;
	int in_close; /* close stdin once in_buf drains */
	int tty_fd;   /* the PTY master (for TIOCSWINSZ) if the EXEC has a TTY, else -1;
		       * then out[PIPE_OUT].fd and in_fd are dups of it */
};

struct upload {
	uint32_t id;
	int fd;
	int err;           /* first failure, reported when the upload finishes */
	const char *stage; /* what failed */
	char *path, *tmp;
	uint32_t mode, uid, gid;
};

static struct {
	int init_mode;
	int ctl;
	int connected;
	int seen_host; /* a host has sent us something since boot */
	int64_t down_since_ms, retry_at_ms;
	int sigfd;
	unsigned char *in; /* control input: in[in_off .. in_off+in_len) */
	size_t in_off, in_len;
	uint64_t discard; /* payload bytes of an oversized frame still to skip */
	int resyncing;
	struct exec_proc *execs[MAX_EXECS];
	int nexecs;
	struct upload *uploads[MAX_UPLOADS];
	int nuploads;
	size_t stdin_pending;
	unsigned tmp_counter;
	volatile sig_atomic_t alarm_fired;
} g = { .ctl = -1, .sigfd = -1, .connected = 1 };

static unsigned char chunk[OUT_CHUNK]; /* scratch for file reads (and unbuffered output) */
static int log_fd = STDERR_FILENO;

/* ---- small utilities --------------------------------------------------- */

static void logmsg(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void logmsg(const char *fmt, ...)
{
	char line[1024];
	size_t n = (size_t)snprintf(line, sizeof line, "torpor-agent: ");
	size_t room = sizeof line - n - 1; /* keep one byte for the newline */
	va_list ap;
	va_start(ap, fmt);
	int m = vsnprintf(line + n, room, fmt, ap);
	va_end(ap);
	if (m > 0)
		n += (size_t)m < room ? (size_t)m : room - 1;
	line[n++] = '\n';
	if (write(log_fd, line, n) < 0) {
		/* nowhere left to complain to */
	}
}

static int64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static int64_t now_ms(void)
{
	return now_ns() / 1000000;
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	while (nanosleep(&ts, &ts) < 0 && errno == EINTR) {
	}
}

static int write_all(int fd, const void *buf, size_t len)
{
	const unsigned char *p = buf;
	while (len > 0) {
		ssize_t n = write(fd, p, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static void set_nonblock(int fd)
{
	int fl = fcntl(fd, F_GETFL);
	if (fl >= 0)
		fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void close_fd(int *fd)
{
	if (*fd >= 0) {
		close(*fd);
		*fd = -1;
	}
}

/* Children inherit nothing else, so 0-2 must be taken before any pipe2(). */
static void ensure_std_fds(void)
{
	for (int fd = 0; fd < 3; fd++) {
		if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", O_RDWR) < 0)
			logmsg("open /dev/null: %s", strerror(errno));
	}
}

/* ---- payload encoding -------------------------------------------------- */

struct wbuf {
	unsigned char d[WBUF_CAP];
	size_t len;
};

static void wb_raw(struct wbuf *w, const void *p, size_t n)
{
	if (n > WBUF_CAP - w->len)
		n = WBUF_CAP - w->len;
	memcpy(w->d + w->len, p, n);
	w->len += n;
}

static void wb_u32(struct wbuf *w, uint32_t v)
{
	unsigned char b[4] = { (unsigned char)v, (unsigned char)(v >> 8), (unsigned char)(v >> 16),
			       (unsigned char)(v >> 24) };
	wb_raw(w, b, 4);
}

static void wb_u64(struct wbuf *w, uint64_t v)
{
	wb_u32(w, (uint32_t)v);
	wb_u32(w, (uint32_t)(v >> 32));
}

/* Clips the string rather than overflow: only error messages can be that long. */
static void wb_str(struct wbuf *w, const void *s, size_t n)
{
	size_t room = WBUF_CAP - w->len;
	room = room >= 4 ? room - 4 : 0;
	if (n > room)
		n = room;
	wb_u32(w, (uint32_t)n);
	wb_raw(w, s, n);
}

static uint32_t get_u32(const unsigned char *p)
{
	return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* ---- payload decoding -------------------------------------------------- */

struct rd {
	const unsigned char *p;
	size_t len, off;
	int bad, nomem;
};

static uint32_t rd_u32(struct rd *r)
{
	if (r->bad || r->len - r->off < 4) {
		r->bad = 1;
		return 0;
	}
	uint32_t v = get_u32(r->p + r->off);
	r->off += 4;
	return v;
}

static uint64_t rd_u64(struct rd *r)
{
	uint64_t lo = rd_u32(r);
	return lo | (uint64_t)rd_u32(r) << 32;
}

static const unsigned char *rd_bytes(struct rd *r, size_t *n)
{
	size_t len = rd_u32(r);
	if (r->bad || r->len - r->off < len) {
		r->bad = 1;
		return NULL;
	}
	const unsigned char *s = r->p + r->off;
	r->off += len;
	*n = len;
	return s;
}

/* A NUL-terminated heap copy; an embedded NUL makes the payload malformed. */
static char *rd_cstr(struct rd *r)
{
	size_t n;
	const unsigned char *s = rd_bytes(r, &n);
	if (!s)
		return NULL;
	if (memchr(s, 0, n)) {
		r->bad = 1;
		return NULL;
	}
	char *c = malloc(n + 1);
	if (!c) {
		r->bad = r->nomem = 1;
		return NULL;
	}
	memcpy(c, s, n);
	c[n] = '\0';
	return c;
}

static void free_list(char **v)
{
	if (v) {
		for (char **p = v; *p; p++)
			free(*p);
		free(v);
	}
}

static char **rd_strlist(struct rd *r)
{
	size_t count = rd_u32(r);
	if (r->bad || count > (r->len - r->off) / 4) { /* each str takes >= 4 bytes */
		r->bad = 1;
		return NULL;
	}
	char **v = calloc(count + 1, sizeof *v);
	if (!v) {
		r->bad = r->nomem = 1;
		return NULL;
	}
	for (size_t i = 0; i < count; i++) {
		if (!(v[i] = rd_cstr(r))) {
			free_list(v);
			return NULL;
		}
	}
	return v;
}

static int rd_done(const struct rd *r)
{
	return !r->bad && r->off == r->len;
}

/* ---- frames to the host ------------------------------------------------ */

static void abort_uploads(void);

/* The host end went away (EOF, EPIPE, POLLHUP). In init mode keep serving the
 * children and wait for it to come back; in host mode there is no "back". */
static void hangup_ttys(void);
static void host_gone(const char *why)
{
	if (!g.init_mode) {
		hangup_ttys();
		abort_uploads();
		exit(0);
	}
	if (g.connected) {
		hangup_ttys();
		if (g.seen_host)
			logmsg("host disconnected (%s); processes keep running", why);
		g.down_since_ms = now_ms();
	}
	g.connected = 0;
	g.retry_at_ms = now_ms();
}

static int wait_ctl_writable(void)
{
	struct pollfd p = { .fd = g.ctl, .events = POLLOUT };
	for (;;) {
		if (poll(&p, 1, -1) < 0) {
			if (errno == EINTR && !g.alarm_fired)
				continue;
			return -1;
		}
		if (p.revents & POLLOUT)
			return 0;
		if (p.revents & (POLLHUP | POLLERR | POLLNVAL))
			return -1;
	}
}

/* Writes one whole frame, waiting while the port is full; drops it if no host. */
static void send_frame(uint8_t type, uint32_t id, const void *payload, size_t len)
{
	if (!g.connected)
		return;
	unsigned char hdr[HDR_LEN] = { MAGIC_LO, MAGIC_HI, type, 0 };
	for (int i = 0; i < 4; i++) {
		hdr[4 + i] = (unsigned char)(id >> (8 * i));
		hdr[8 + i] = (unsigned char)(len >> (8 * i));
	}
	struct iovec iov[2] = { { hdr, HDR_LEN }, { (void *)payload, len } };
	struct iovec *v = iov;
	int cnt = 2;
	size_t left = HDR_LEN + len;
	while (left > 0) {
		ssize_t n = writev(g.ctl, v, cnt);
		if (n < 0) {
			if (errno == EINTR && !g.alarm_fired)
				continue;
			if (errno == EAGAIN && wait_ctl_writable() == 0)
				continue;
			host_gone(errno == EAGAIN ? "hang-up" : strerror(errno));
			return;
		}
		left -= (size_t)n;
		while (cnt > 0 && (size_t)n >= v->iov_len) {
			n -= (ssize_t)v->iov_len;
			v++;
			cnt--;
		}
		if (cnt > 0) {
			v->iov_base = (char *)v->iov_base + n;
			v->iov_len -= (size_t)n;
		}
	}
}

static void send_wbuf(uint8_t type, uint32_t id, const struct wbuf *w)
{
	send_frame(type, id, w->d, w->len);
}

static void send_ok(uint32_t id)
{
	send_frame(T_OK, id, NULL, 0);
}

static void send_error(uint32_t id, int err, const char *fmt, ...)
	__attribute__((format(printf, 3, 4)));
static void send_error(uint32_t id, int err, const char *fmt, ...)
{
	static struct wbuf w;
	char msg[4096 + 256];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(msg, sizeof msg, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if ((size_t)n >= sizeof msg)
		n = sizeof msg - 1;
	w.len = 0;
	wb_u32(&w, (uint32_t)err);
	wb_str(&w, msg, (size_t)n);
	send_wbuf(T_ERROR, id, &w);
}

static void send_malformed(uint32_t id, const char *what, const struct rd *r)
{
	if (r->nomem)
		send_error(id, ENOMEM, "%s: out of memory", what);
	else
		send_error(id, EINVAL, "malformed %s payload", what);
}

/* ---- EXEC: the child side ---------------------------------------------- */

/* Calls fn for each line of an /etc database split on ':', until fn returns nonzero. */
static int scan_db(const char *file, int (*fn)(char **f, int n, void *ctx), void *ctx)
{
	FILE *fp = fopen(file, "re");
	if (!fp)
		return 0;
	char line[4096];
	int found = 0;
	while (!found && fgets(line, sizeof line, fp)) {
		char *f[8];
		int n = 0;
		line[strcspn(line, "\r\n")] = '\0';
		for (char *s = line; n < 8; n++) {
			f[n] = s;
			s = strchr(s, ':');
			if (!s) {
				n++;
				break;
			}
			*s++ = '\0';
		}
		found = fn(f, n, ctx);
	}
	fclose(fp);
	return found;
}

static int parse_id(const char *s, uint32_t *out)
{
	if (!*s || strspn(s, "0123456789") != strlen(s) || strlen(s) > 10)
		return 0;
	unsigned long long v = strtoull(s, NULL, 10);
	if (v >= 0xFFFFFFFFull) /* (uid_t)-1 means "unchanged" to the kernel */
		return 0;
	*out = (uint32_t)v;
	return 1;
}

struct pw_query {
	const char *name; /* match by name if set, else by uid */
	uint32_t uid, gid;
	char found_name[256];
};

static int pw_match(char **f, int n, void *ctx)
{
	struct pw_query *q = ctx;
	uint32_t uid, gid;
	if (n < 4 || !parse_id(f[2], &uid) || !parse_id(f[3], &gid))
		return 0;
	if (q->name ? strcmp(f[0], q->name) != 0 : uid != q->uid)
		return 0;
	q->uid = uid;
	q->gid = gid;
	snprintf(q->found_name, sizeof q->found_name, "%s", f[0]);
	return 1;
}

struct gr_query {
	const char *name;   /* group to resolve, or NULL */
	const char *member; /* user whose supplementary groups we collect, or NULL */
	uint32_t gid;
	gid_t *groups;
	int ngroups, max;
};

static int gr_match(char **f, int n, void *ctx)
{
	struct gr_query *q = ctx;
	uint32_t gid;
	if (n < 3 || !parse_id(f[2], &gid))
		return 0;
	if (q->name) {
		if (strcmp(f[0], q->name) != 0)
			return 0;
		q->gid = gid;
		return 1;
	}
	if (n < 4)
		return 0;
	for (char *m = strtok(f[3], ","); m; m = strtok(NULL, ",")) {
		if (strcmp(m, q->member) != 0)
			continue;
		for (int i = 0; i < q->ngroups; i++)
			if (q->groups[i] == gid)
				return 0;
		if (q->ngroups < q->max)
			q->groups[q->ngroups++] = gid;
		return 0;
	}
	return 0;
}

/* user is "name", "uid", "name:group" or "uid:gid" (docs/protocol.md). Unknown
 * numeric users get gid 0, like Docker; an explicit group replaces the
 * supplementary groups, like runc. Returns 0 or writes a message. */
static int apply_user(const char *user, char *msg, size_t msgsz)
{
	char spec[256];
	if (snprintf(spec, sizeof spec, "%s", user) >= (int)sizeof spec) {
		snprintf(msg, msgsz, "torpor: user \"%.64s...\": too long\n", user);
		return -1;
	}
	char *grp = strchr(spec, ':');
	if (grp)
		*grp++ = '\0';
	struct pw_query pw = { 0 };
	uint32_t uid, gid = 0;
	if (parse_id(spec, &uid)) {
		pw.uid = uid;
		if (scan_db("/etc/passwd", pw_match, &pw))
			gid = pw.gid;
	} else {
		pw.name = spec;
		if (!*spec || !scan_db("/etc/passwd", pw_match, &pw)) {
			snprintf(msg, msgsz, "torpor: user \"%s\": no such user in /etc/passwd\n", user);
			return -1;
		}
		uid = pw.uid;
		gid = pw.gid;
	}
	gid_t groups[64];
	struct gr_query gq = { .groups = groups, .max = 64 };
	if (grp) {
		gq.name = grp;
		if (parse_id(grp, &gid)) {
		} else if (*grp && scan_db("/etc/group", gr_match, &gq)) {
			gid = gq.gid;
		} else {
			snprintf(msg, msgsz, "torpor: user \"%s\": no such group in /etc/group\n", user);
			return -1;
		}
		groups[0] = gid;
		gq.ngroups = 1;
	} else {
		groups[0] = gid;
		gq.ngroups = 1;
		if (pw.found_name[0]) {
			gq.member = pw.found_name;
			scan_db("/etc/group", gr_match, &gq);
		}
	}
	if (setgroups((size_t)gq.ngroups, groups) < 0 || setgid(gid) < 0 || setuid(uid) < 0) {
		snprintf(msg, msgsz, "torpor: user \"%s\": %s\n", user, strerror(errno));
		return -1;
	}
	return 0;
}

/* execvpe() semantics over the request's own PATH; returns the errno to report. */
static int exec_search(char *const argv[], char *const envp[])
{
	const char *file = argv[0];
	if (!*file)
		return ENOENT;
	if (strchr(file, '/')) {
		execve(file, argv, envp);
		return errno;
	}
	const char *path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
	for (char *const *e = envp; *e; e++) {
		if (strncmp(*e, "PATH=", 5) == 0) {
			path = *e + 5;
			break;
		}
	}
	size_t flen = strlen(file);
	int saw_eacces = 0;
	char buf[PATH_MAX];
	for (const char *p = path;;) {
		const char *end = strchrnul(p, ':');
		size_t dlen = (size_t)(end - p);
		if (dlen + flen + 2 <= sizeof buf) {
			if (dlen) { /* an empty element means the current directory */
				memcpy(buf, p, dlen);
				buf[dlen++] = '/';
			}
			memcpy(buf + dlen, file, flen + 1);
			execve(buf, argv, envp);
			int err = errno;
			if (err == EACCES)
				saw_eacces = 1;
			else if (err != ENOENT && err != ENOTDIR && err != ELOOP && err != ENAMETOOLONG)
				return err;
		}
		if (!*end)
			break;
		p = end + 1;
	}
	return saw_eacces ? EACCES : ENOENT;
}

/* Runs in the forked child; never returns. Failures before execve are written
 * to status_fd as <exit code byte><message> and become STDERR + EXIT. */
static void __attribute__((noreturn))
child_main(int in_fd, int out_fd, int err_fd, int status_fd, int tty, const char *user,
	   const char *cwd, char *const argv[], char *const envp[])
{
	char rec[STATUS_MAX];
	char *msg = rec + 1;
	size_t msgsz = sizeof rec - 1;
	int code = 126;

	sigset_t none;
	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	for (int sig = 1; sig < _NSIG; sig++)
		signal(sig, SIG_DFL); /* SIG_IGN (e.g. SIGPIPE) would survive execve */
	setsid();

	if (in_fd < 0)
		in_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
	if (in_fd < 0 || dup2(in_fd, 0) < 0 || dup2(out_fd, 1) < 0 || dup2(err_fd, 2) < 0) {
		snprintf(msg, msgsz, "torpor: setting up stdio: %s\n", strerror(errno));
		goto fail;
	}
	/* the PTY slave becomes the controlling terminal of our new session, so ^C
	 * and hang-ups reach the foreground process group */
	if (tty && ioctl(0, TIOCSCTTY, 0) < 0) {
		snprintf(msg, msgsz, "torpor: TIOCSCTTY: %s\n", strerror(errno));
		goto fail;
	}
	if (*user && apply_user(user, msg, msgsz) < 0)
		goto fail;
	if (chdir(*cwd ? cwd : "/") < 0) {
		snprintf(msg, msgsz, "torpor: chdir \"%s\": %s\n", cwd, strerror(errno));
		goto fail;
	}
	int err = exec_search(argv, envp);
	code = err == ENOENT ? 127 : 126;
	snprintf(msg, msgsz, "torpor: exec \"%s\": %s\n", argv[0], strerror(err));
fail:
	rec[0] = (char)code;
	if (write_all(status_fd, rec, 1 + strlen(msg)) < 0) {
		/* the parent still sees the exit code */
	}
	_exit(code);
}

/* ---- EXEC: the agent side ---------------------------------------------- */

static struct exec_proc *find_exec(uint32_t id)
{
	for (int i = 0; i < g.nexecs; i++)
		if (g.execs[i]->id == id)
			return g.execs[i];
	return NULL;
}

static struct upload *find_upload(uint32_t id)
{
	for (int i = 0; i < g.nuploads; i++)
		if (g.uploads[i]->id == id)
			return g.uploads[i];
	return NULL;
}

/* A new PTY pair of the given size: *master and *slave, both O_CLOEXEC. */
static int open_pty(uint32_t cols, uint32_t rows, int *master, int *slave)
{
	char name[64];
	struct winsize ws = { .ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols };
	*master = posix_openpt(O_RDWR | O_NOCTTY | O_CLOEXEC);
	if (*master < 0)
		return -1;
	if (grantpt(*master) < 0 || unlockpt(*master) < 0 ||
	    ptsname_r(*master, name, sizeof name) != 0 ||
	    ioctl(*master, TIOCSWINSZ, &ws) < 0 ||
	    (*slave = open(name, O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0) {
		int saved = errno;
		close_fd(master);
		errno = saved;
		return -1;
	}
	return 0;
}

/* With a TTY the child's stdin, stdout and stderr are the PTY slave, and our
 * stdout reader and stdin writer are dups of the master: the pipe machinery
 * below then serves a terminal unchanged (one output stream, never stderr). */
static void start_exec(uint32_t id, uint32_t flags, uint32_t cols, uint32_t rows,
		       const char *user, const char *cwd, char **argv, char **envp)
{
	int out[2] = { -1, -1 }, err[2] = { -1, -1 }, in[2] = { -1, -1 }, st[2] = { -1, -1 };
	int master = -1, slave = -1;
	int tty = (flags & EXEC_FLAG_TTY) != 0;
	struct exec_proc *e = calloc(1, sizeof *e);
	pid_t pid = -1;
	if (e && tty) {
		if (open_pty(cols, rows, &master, &slave) == 0 &&
		    (out[0] = fcntl(master, F_DUPFD_CLOEXEC, 0)) >= 0 &&
		    (in[1] = fcntl(master, F_DUPFD_CLOEXEC, 0)) >= 0 &&
		    pipe2(st, O_CLOEXEC) == 0)
			pid = fork();
		if (pid == 0)
			child_main(slave, slave, slave, st[1], 1, user, cwd, argv, envp);
	} else if (e && pipe2(out, O_CLOEXEC) == 0 && pipe2(err, O_CLOEXEC) == 0 &&
	    pipe2(st, O_CLOEXEC) == 0 &&
	    (!(flags & EXEC_FLAG_STDIN) || pipe2(in, O_CLOEXEC) == 0)) {
		pid = fork();
		if (pid == 0)
			child_main(in[0], out[1], err[1], st[1], 0, user, cwd, argv, envp);
	}
	int saved = e ? errno : ENOMEM;
	close_fd(&slave);
	close_fd(&out[1]);
	close_fd(&err[1]);
	close_fd(&st[1]);
	close_fd(&in[0]);
	if (pid < 0) {
		close_fd(&master);
		close_fd(&out[0]);
		close_fd(&err[0]);
		close_fd(&st[0]);
		close_fd(&in[1]);
		free(e);
		send_error(id, saved, "exec \"%s\": %s", argv[0], strerror(saved));
		return;
	}
	*e = (struct exec_proc){ .id = id, .pid = pid, .in_fd = in[1], .status_fd = st[0],
				 .tty_fd = master,
				 .out = { { .fd = out[0], .type = T_STDOUT },
					  { .fd = err[0], .type = T_STDERR } } };
	set_nonblock(e->out[PIPE_OUT].fd);
	if (e->out[PIPE_ERR].fd >= 0)
		set_nonblock(e->out[PIPE_ERR].fd);
	set_nonblock(e->status_fd);
	if (e->in_fd >= 0)
		set_nonblock(e->in_fd);
	g.execs[g.nexecs++] = e;

	struct wbuf w = { .len = 0 };
	wb_u32(&w, (uint32_t)pid);
	send_wbuf(T_STARTED, id, &w);
}

static void handle_exec(uint32_t id, struct rd *r)
{
	uint32_t flags = rd_u32(r);
	char *user = rd_cstr(r);
	char *cwd = rd_cstr(r);
	char **argv = rd_strlist(r);
	char **envp = rd_strlist(r);
	uint32_t cols = 0, rows = 0;
	if (flags & EXEC_FLAG_TTY) {
		cols = rd_u32(r);
		rows = rd_u32(r);
	}
	if (!rd_done(r) || !argv || !envp || !argv[0] ||
	    (flags & ~(EXEC_FLAG_STDIN | EXEC_FLAG_TTY)))
		send_malformed(id, "EXEC", r);
	else if ((flags & EXEC_FLAG_TTY) && (cols < 1 || cols > TTY_MAX || rows < 1 || rows > TTY_MAX))
		send_error(id, EINVAL, "terminal size %ux%u not in 1..%d", cols, rows, TTY_MAX);
	else if (g.nexecs == MAX_EXECS)
		send_error(id, EAGAIN, "too many running processes (%d)", MAX_EXECS);
	else
		start_exec(id, flags, cols, rows, user, cwd, argv, envp);
	free(user);
	free(cwd);
	free_list(argv);
	free_list(envp);
}

static void out_flush(struct exec_proc *e, struct out_stream *s)
{
	if (s->len > 0) {
		send_frame(s->type, e->id, s->buf, s->len);
		s->len = 0;
	}
}

/* One read of at most `max` bytes from output pipe `which`, coalesced into its
 * buffer (see Design). Returns the bytes read: 0 if none were ready or the pipe
 * is closed (then what was buffered has been sent). */
static size_t out_read(struct exec_proc *e, int which, size_t max)
{
	struct out_stream *s = &e->out[which];
	if (s->fd < 0)
		return 0;
	if (!s->buf)
		s->buf = malloc(OUT_CHUNK); /* if that fails, forward unbuffered via chunk */
	unsigned char *dst = s->buf ? s->buf + s->len : chunk;
	size_t room = s->buf ? OUT_CHUNK - s->len : sizeof chunk; /* > 0: len < THRESHOLD */
	ssize_t n;
	do
		n = read(s->fd, dst, max < room ? max : room);
	while (n < 0 && errno == EINTR);
	if (n < 0 && errno == EAGAIN)
		return 0;
	if (n <= 0) { /* the writers closed it (or it broke): nothing more will come */
		out_flush(e, s);
		close_fd(&s->fd);
		return 0;
	}
	out_flush(e, &e->out[!which]); /* the other stream's bytes were read first */
	if (!s->buf) {
		send_frame(s->type, e->id, chunk, (size_t)n);
		return (size_t)n;
	}
	if (s->len == 0)
		s->due_ns = now_ns() + FLUSH_DELAY_MS * 1000000LL;
	s->len += (size_t)n;
	if (s->len >= FLUSH_THRESHOLD)
		out_flush(e, s);
	else if (e->tty_fd >= 0 && s->len == (size_t)n && n <= TTY_ECHO_MAX)
		out_flush(e, s); /* a keystroke's echo or a prompt: someone is waiting for it */
	return (size_t)n;
}

/* Sends exactly what the pipe holds now, and what was buffered before it: a
 * background grandchild that keeps writing must not delay EXIT. */
static void out_drain(struct exec_proc *e, int which)
{
	struct out_stream *s = &e->out[which];
	int avail = 0;
	if (s->fd < 0 || ioctl(s->fd, FIONREAD, &avail) < 0 || avail < 0)
		avail = 0;
	size_t left = (size_t)avail, n;
	while (left > 0 && (n = out_read(e, which, left)) > 0)
		left -= n;
	out_flush(e, s);
}

/* Sends the buffers whose deadline has passed. Returns the time in ns until
 * the earliest remaining deadline, or -1 if there is none. */
static int64_t out_flush_due(void)
{
	int64_t now = now_ns(), next = INT64_MAX;
	for (int i = 0; i < g.nexecs; i++) {
		for (int k = PIPE_OUT; k <= PIPE_ERR; k++) {
			struct out_stream *s = &g.execs[i]->out[k];
			if (s->len == 0)
				continue;
			if (s->due_ns <= now)
				out_flush(g.execs[i], s);
			else if (s->due_ns < next)
				next = s->due_ns;
		}
	}
	return next == INT64_MAX ? -1 : next - now;
}

static void stdin_discard(struct exec_proc *e)
{
	g.stdin_pending -= e->in_len - e->in_off;
	free(e->in_buf);
	e->in_buf = NULL;
	e->in_off = e->in_len = e->in_cap = 0;
}

static void stdin_close(struct exec_proc *e)
{
	stdin_discard(e);
	close_fd(&e->in_fd);
	e->in_close = 1;
}

/* Writes what the pipe takes; returns bytes written or -1 if stdin broke. */
static ssize_t stdin_write(struct exec_proc *e, const unsigned char *p, size_t n)
{
	for (;;) {
		ssize_t w = write(e->in_fd, p, n);
		if (w >= 0)
			return w;
		if (errno == EINTR)
			continue;
		if (errno == EAGAIN)
			return 0;
		stdin_close(e); /* EPIPE: the child closed its stdin; the rest is lost */
		return -1;
	}
}

static void stdin_flush(struct exec_proc *e)
{
	while (e->in_fd >= 0 && e->in_off < e->in_len) {
		ssize_t w = stdin_write(e, e->in_buf + e->in_off, e->in_len - e->in_off);
		if (w <= 0)
			return;
		e->in_off += (size_t)w;
		g.stdin_pending -= (size_t)w;
	}
	if (e->in_fd >= 0 && e->in_close)
		stdin_close(e);
}

static void stdin_push(struct exec_proc *e, const unsigned char *p, size_t n)
{
	if (e->in_fd < 0 || e->in_close)
		return; /* stdin not piped or already closed: like writing to a closed pipe */
	if (e->in_off == e->in_len) {
		ssize_t w = stdin_write(e, p, n);
		if (w < 0)
			return;
		p += w;
		n -= (size_t)w;
		if (n == 0)
			return;
	}
	if (e->in_off > 0) {
		memmove(e->in_buf, e->in_buf + e->in_off, e->in_len - e->in_off);
		e->in_len -= e->in_off;
		e->in_off = 0;
	}
	if (e->in_cap - e->in_len < n) {
		size_t cap = e->in_cap ? e->in_cap : 64 * 1024;
		while (cap - e->in_len < n)
			cap *= 2;
		unsigned char *nb = realloc(e->in_buf, cap);
		if (!nb) {
			logmsg("exec %u: out of memory buffering stdin; closing it", e->id);
			stdin_close(e);
			return;
		}
		e->in_buf = nb;
		e->in_cap = cap;
	}
	memcpy(e->in_buf + e->in_len, p, n);
	e->in_len += n;
	g.stdin_pending += n;
}

static void finish_exec(struct exec_proc *e, int status)
{
	/* A terminal's output reaches the master through a kernel work queue, so
	 * FIONREAD may not count it yet; a read waits for it once the slave is
	 * closed (then EIO). At most 1 MiB: a leftover writer must not stall us. */
	for (size_t got = 0, n = 1; e->tty_fd >= 0 && n > 0 && got < MAX_PAYLOAD; got += n)
		n = out_read(e, PIPE_OUT, OUT_CHUNK);
	out_drain(e, PIPE_OUT);
	out_drain(e, PIPE_ERR);
	char rec[STATUS_MAX];
	ssize_t n = read(e->status_fd, rec, sizeof rec);
	if (n > 1)
		send_frame(T_STDERR, e->id, rec + 1, (size_t)n - 1);
	for (int k = PIPE_OUT; k <= PIPE_ERR; k++) {
		close_fd(&e->out[k].fd);
		free(e->out[k].buf);
	}
	close_fd(&e->status_fd);
	stdin_close(e);
	close_fd(&e->tty_fd); /* the last master fd: leftovers on the terminal get SIGHUP */

	int32_t code = 0;
	uint32_t sig = 0;
	if (WIFEXITED(status)) {
		code = WEXITSTATUS(status);
	} else if (WIFSIGNALED(status)) {
		sig = (uint32_t)WTERMSIG(status);
		code = 128 + (int32_t)sig;
	}
	struct wbuf w = { .len = 0 };
	wb_u32(&w, (uint32_t)code);
	wb_u32(&w, sig);
	send_wbuf(T_EXIT, e->id, &w);

	for (int i = 0; i < g.nexecs; i++) {
		if (g.execs[i] == e) {
			g.execs[i] = g.execs[--g.nexecs];
			break;
		}
	}
	free(e);
}

/* waitpid(-1) also reaps orphans re-parented to us (PID 1 or subreaper). */
static void reap_children(void)
{
	struct signalfd_siginfo si;
	while (read(g.sigfd, &si, sizeof si) == (ssize_t)sizeof si) {
	}
	for (;;) {
		int status;
		pid_t pid = waitpid(-1, &status, WNOHANG);
		if (pid <= 0)
			return;
		for (int i = 0; i < g.nexecs; i++) {
			if (g.execs[i]->pid == pid) {
				finish_exec(g.execs[i], status);
				break;
			}
		}
	}
}

/* Signals the EXEC's process group; with a TTY, SIGHUP (a hang-up) also
 * reaches the terminal's foreground job, which a job-control shell keeps in a
 * process group of its own. */
static void signal_exec(struct exec_proc *e, int signo)
{
	if (kill(-e->pid, signo) < 0 && errno == ESRCH)
		kill(e->pid, signo); /* the child has not reached setsid() yet */
	pid_t fg;
	if (signo == SIGHUP && e->tty_fd >= 0 && (fg = tcgetpgrp(e->tty_fd)) > 1 && fg != e->pid) {
		kill(-fg, SIGHUP);
		kill(-fg, SIGCONT); /* a stopped job would not see the SIGHUP until continued */
	}
}

static void cancel_upload(struct upload *u);

static void handle_signal(uint32_t id, struct rd *r)
{
	uint32_t signo = rd_u32(r);
	struct exec_proc *e;
	struct upload *u;
	if (!rd_done(r))
		send_malformed(id, "SIGNAL", r);
	else if ((u = find_upload(id)))
		cancel_upload(u); /* any signo: the host's source failed part-way */
	else if (!(e = find_exec(id)))
		send_error(id, ESRCH, "no running process with request id %u", id);
	else if (signo < 1 || signo >= _NSIG)
		send_error(id, EINVAL, "invalid signal %u", signo);
	else
		signal_exec(e, (int)signo);
}

static void handle_resize(uint32_t id, struct rd *r)
{
	uint32_t cols = rd_u32(r), rows = rd_u32(r);
	struct exec_proc *e;
	if (!rd_done(r))
		send_malformed(id, "RESIZE", r);
	else if (!(e = find_exec(id)))
		send_error(id, ESRCH, "no running process with request id %u", id);
	else if (e->tty_fd < 0)
		send_error(id, ENOTTY, "request %u has no terminal", id);
	else if (cols < 1 || cols > TTY_MAX || rows < 1 || rows > TTY_MAX)
		send_error(id, EINVAL, "terminal size %ux%u not in 1..%d", cols, rows, TTY_MAX);
	else {
		/* the kernel sends SIGWINCH to the terminal's foreground process group */
		struct winsize ws = { .ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols };
		if (ioctl(e->tty_fd, TIOCSWINSZ, &ws) < 0)
			send_error(id, errno, "TIOCSWINSZ: %s", strerror(errno));
	}
}

/* The host that started these terminals is gone: hang them up like a closed
 * terminal window would, so no interactive shell is left waiting for input. */
static void hangup_ttys(void)
{
	for (int i = 0; i < g.nexecs; i++)
		if (g.execs[i]->tty_fd >= 0)
			signal_exec(g.execs[i], SIGHUP);
}

/* ---- WRITE_FILE -------------------------------------------------------- */

static void free_upload(struct upload *u)
{
	for (int i = 0; i < g.nuploads; i++) {
		if (g.uploads[i] == u) {
			g.uploads[i] = g.uploads[--g.nuploads];
			break;
		}
	}
	free(u->path);
	free(u->tmp);
	free(u);
}

/* An upload that will not finish: its temporary file goes, the target is untouched. */
static void drop_upload(struct upload *u)
{
	if (u->fd >= 0) {
		close(u->fd);
		unlink(u->tmp);
	}
	free_upload(u);
}

static void abort_uploads(void)
{
	while (g.nuploads > 0)
		drop_upload(g.uploads[0]);
}

/* The host gave up on an upload (SIGNAL to its id: its source failed part-way): the
 * slot is free again at once, and the ERROR ends the request. */
static void cancel_upload(struct upload *u)
{
	send_error(u->id, ECANCELED, "write_file \"%s\": cancelled by the host", u->path);
	drop_upload(u);
}

/* A temporary name next to `path`, so the final rename() stays on one filesystem. */
static char *sibling_tmp(const char *path)
{
	const char *slash = strrchr(path, '/');
	int dlen = slash ? (int)(slash - path) + 1 : 0;
	char *tmp = NULL;
	if (asprintf(&tmp, "%.*s.torpor-tmp-%d-%u", dlen, path, (int)getpid(), ++g.tmp_counter) < 0)
		return NULL;
	return tmp;
}

static void upload_fail(struct upload *u, const char *stage)
{
	if (!u->err) {
		u->err = errno;
		u->stage = stage;
	}
}

static void handle_write_file(uint32_t id, struct rd *r)
{
	uint32_t mode = rd_u32(r), uid = rd_u32(r), gid = rd_u32(r);
	char *path = rd_cstr(r), *tmp = NULL;
	struct upload *u = NULL;
	if (!rd_done(r) || !path) {
		send_malformed(id, "WRITE_FILE", r);
	} else if (g.nuploads == MAX_UPLOADS) {
		send_error(id, EAGAIN, "too many files being written (%d)", MAX_UPLOADS);
	} else if (!(tmp = sibling_tmp(path)) || !(u = malloc(sizeof *u))) {
		send_error(id, ENOMEM, "write_file: out of memory");
	} else {
		/* Failures are kept until the empty STDIN: that is when the host
		 * expects the reply (docs/protocol.md). */
		*u = (struct upload){ .id = id, .path = path, .tmp = tmp, .mode = mode,
				      .uid = uid, .gid = gid };
		u->fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
		if (u->fd < 0)
			upload_fail(u, "create");
		g.uploads[g.nuploads++] = u;
		return;
	}
	free(tmp);
	free(path);
}

static void upload_finish(struct upload *u)
{
	int created = u->fd >= 0;
	if (!u->err && (u->uid != 0xFFFFFFFFu || u->gid != 0xFFFFFFFFu) &&
	    fchown(u->fd, (uid_t)u->uid, (gid_t)u->gid) < 0)
		upload_fail(u, "chown");
	/* after fchown, which clears set-id bits */
	if (!u->err && fchmod(u->fd, (mode_t)(u->mode & 07777)) < 0)
		upload_fail(u, "chmod");
	if (!u->err && fsync(u->fd) < 0)
		upload_fail(u, "fsync");
	if (created && close(u->fd) < 0)
		upload_fail(u, "close");
	u->fd = -1;
	if (!u->err && rename(u->tmp, u->path) < 0)
		upload_fail(u, "rename");
	if (u->err) {
		if (created)
			unlink(u->tmp);
		send_error(u->id, u->err, "write_file \"%s\": %s: %s", u->path, u->stage,
			   strerror(u->err));
	} else {
		send_ok(u->id);
	}
	free_upload(u);
}

static void handle_stdin(uint32_t id, const unsigned char *p, size_t len)
{
	struct upload *u = find_upload(id);
	struct exec_proc *e;
	if (u) {
		if (len == 0)
			upload_finish(u);
		else if (!u->err && write_all(u->fd, p, len) < 0)
			upload_fail(u, "write");
	} else if ((e = find_exec(id))) {
		if (len > 0) {
			stdin_push(e, p, len);
		} else if (e->in_fd >= 0 && !e->in_close) {
			e->in_close = 1;
			stdin_flush(e);
		}
	} else {
		send_error(id, ESRCH, "no running request with id %u", id);
	}
}

/* ---- file requests ----------------------------------------------------- */

static void wb_fileinfo(struct wbuf *w, const struct stat *st)
{
	wb_u32(w, (uint32_t)st->st_mode);
	wb_u64(w, (uint64_t)st->st_size);
	wb_u32(w, (uint32_t)st->st_uid);
	wb_u32(w, (uint32_t)st->st_gid);
	wb_u64(w, (uint64_t)(int64_t)st->st_mtime);
}

static char *path_arg(uint32_t id, struct rd *r, const char *what)
{
	char *path = rd_cstr(r);
	if (rd_done(r) && path)
		return path;
	send_malformed(id, what, r);
	free(path);
	return NULL;
}

static void handle_read_file(uint32_t id, struct rd *r)
{
	char *path = path_arg(id, r, "READ_FILE");
	if (!path)
		return;
	struct stat st;
	/* O_NONBLOCK: opening a FIFO must not hang the loop */
	int fd = open(path, O_RDONLY | O_NOCTTY | O_NONBLOCK | O_CLOEXEC);
	if (fd < 0 || fstat(fd, &st) < 0) {
		send_error(id, errno, "read_file \"%s\": %s", path, strerror(errno));
	} else if (!S_ISREG(st.st_mode)) {
		int err = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
		send_error(id, err, "read_file \"%s\": %s", path,
			   err == EISDIR ? strerror(err) : "not a regular file");
	} else {
		struct wbuf w = { .len = 0 };
		wb_fileinfo(&w, &st);
		wb_str(&w, "", 0);
		send_wbuf(T_FILEINFO, id, &w);
		for (;;) {
			ssize_t n = read(fd, chunk, sizeof chunk);
			if (n < 0 && errno == EINTR)
				continue;
			if (n < 0) {
				send_error(id, errno, "read_file \"%s\": %s", path, strerror(errno));
				break;
			}
			if (n == 0) {
				send_ok(id);
				break;
			}
			send_frame(T_DATA, id, chunk, (size_t)n);
			if (!g.connected)
				break;
		}
	}
	if (fd >= 0)
		close(fd);
	free(path);
}

static void handle_stat(uint32_t id, struct rd *r)
{
	char *path = path_arg(id, r, "STAT");
	if (!path)
		return;
	struct stat st;
	char link[PATH_MAX];
	ssize_t ln = 0;
	if (lstat(path, &st) < 0 ||
	    (S_ISLNK(st.st_mode) && (ln = readlink(path, link, sizeof link)) < 0)) {
		send_error(id, errno, "stat \"%s\": %s", path, strerror(errno));
	} else {
		struct wbuf w = { .len = 0 };
		wb_fileinfo(&w, &st);
		wb_str(&w, link, (size_t)ln);
		send_wbuf(T_FILEINFO, id, &w);
	}
	free(path);
}

static void handle_list_dir(uint32_t id, struct rd *r)
{
	char *path = path_arg(id, r, "LIST_DIR");
	if (!path)
		return;
	DIR *d = NULL;
	int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (fd < 0 || !(d = fdopendir(fd))) {
		send_error(id, errno, "list_dir \"%s\": %s", path, strerror(errno));
		if (fd >= 0)
			close(fd);
		free(path);
		return;
	}
	static struct wbuf w;
	for (;;) {
		errno = 0;
		struct dirent *de = readdir(d);
		if (!de) {
			if (errno)
				send_error(id, errno, "list_dir \"%s\": %s", path, strerror(errno));
			else
				send_ok(id);
			break;
		}
		if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, ".."))
			continue;
		struct stat st;
		char link[PATH_MAX];
		ssize_t ln = 0;
		if (fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
			continue; /* removed while we were listing */
		if (S_ISLNK(st.st_mode) && (ln = readlinkat(dirfd(d), de->d_name, link, sizeof link)) < 0)
			ln = 0;
		w.len = 0;
		wb_u32(&w, (uint32_t)st.st_mode);
		wb_u64(&w, (uint64_t)st.st_size);
		wb_str(&w, de->d_name, strlen(de->d_name));
		wb_str(&w, link, (size_t)ln);
		send_wbuf(T_DIRENT, id, &w);
	}
	closedir(d);
	free(path);
}

/* mkdir -p: missing parents get 0755 (before umask), the last one exactly `mode`. */
static int mkdir_p(char *path, mode_t mode)
{
	size_t n = strlen(path);
	while (n > 1 && path[n - 1] == '/')
		path[--n] = '\0';
	for (char *p = path + 1; *p; p++) {
		if (*p != '/')
			continue;
		*p = '\0';
		int rc = mkdir(path, 0755);
		*p = '/';
		if (rc < 0 && errno != EEXIST)
			return -1;
	}
	if (mkdir(path, mode) == 0)
		return chmod(path, mode); /* the umask must not narrow the requested mode */
	if (errno != EEXIST)
		return -1;
	struct stat st;
	if (stat(path, &st) == 0 && S_ISDIR(st.st_mode))
		return 0;
	errno = EEXIST;
	return -1;
}

static void handle_mkdir(uint32_t id, struct rd *r)
{
	uint32_t mode = rd_u32(r);
	char *path = path_arg(id, r, "MKDIR");
	if (!path)
		return;
	if (!*path) {
		errno = ENOENT;
		send_error(id, errno, "mkdir \"\": %s", strerror(errno));
	} else if (mkdir_p(path, (mode_t)(mode & 07777)) < 0) {
		send_error(id, errno, "mkdir \"%s\": %s", path, strerror(errno));
	} else {
		send_ok(id);
	}
	free(path);
}

static void handle_symlink(uint32_t id, struct rd *r)
{
	char *target = rd_cstr(r);
	char *path = rd_cstr(r);
	char *tmp = NULL;
	if (!rd_done(r) || !target || !path) {
		send_malformed(id, "SYMLINK", r);
	} else if (!(tmp = sibling_tmp(path))) {
		send_error(id, ENOMEM, "symlink: out of memory");
	} else if (symlink(target, tmp) < 0) {
		send_error(id, errno, "symlink \"%s\": %s", path, strerror(errno));
	} else if (rename(tmp, path) < 0) { /* atomic replace; fails on a directory */
		int err = errno;
		unlink(tmp);
		send_error(id, err, "symlink \"%s\": %s", path, strerror(err));
	} else {
		send_ok(id);
	}
	free(tmp);
	free(target);
	free(path);
}

/* ---- other requests ---------------------------------------------------- */

static void handle_hello(uint32_t id, struct rd *r)
{
	if (!rd_done(r)) {
		send_malformed(id, "HELLO", r);
		return;
	}
	struct timespec ts;
	clock_gettime(CLOCK_BOOTTIME, &ts);
	struct wbuf w = { .len = 0 };
	wb_u32(&w, PROTOCOL_VERSION);
	wb_str(&w, AGENT_VERSION, strlen(AGENT_VERSION));
	wb_u64(&w, (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec);
	send_wbuf(T_HELLO_OK, id, &w);
}

static void handle_set_time(uint32_t id, struct rd *r)
{
	struct timespec ts;
	ts.tv_sec = (time_t)(int64_t)rd_u64(r);
	uint32_t ns = rd_u32(r);
	if (!rd_done(r)) {
		send_malformed(id, "SET_TIME", r);
	} else if (ns >= 1000000000u) {
		send_error(id, EINVAL, "set_time: nanoseconds out of range (%u)", ns);
	} else {
		ts.tv_nsec = (long)ns;
		if (clock_settime(CLOCK_REALTIME, &ts) < 0)
			send_error(id, errno, "set_time: %s", strerror(errno));
		else
			send_ok(id);
	}
}

static void on_alarm(int sig)
{
	(void)sig;
	g.alarm_fired = 1;
}

static void handle_shutdown(uint32_t id, struct rd *r)
{
	uint32_t how = rd_u32(r);
	if (!rd_done(r)) {
		send_malformed(id, "SHUTDOWN", r);
		return;
	}
	if (how > 1) {
		send_error(id, EINVAL, "shutdown: unknown mode %u (0 power off, 1 reboot)", how);
		return;
	}
	if (!g.init_mode) {
		send_ok(id);
		abort_uploads();
		exit(0);
	}
	/* A blocking write on a virtio port returns once the host has taken the
	 * bytes, so the OK is not lost in the power-off; the alarm bounds the wait
	 * if the host stopped reading. */
	struct sigaction sa = { .sa_handler = on_alarm };
	sigaction(SIGALRM, &sa, NULL);
	int fl = fcntl(g.ctl, F_GETFL);
	fcntl(g.ctl, F_SETFL, fl & ~O_NONBLOCK);
	alarm(2);
	send_ok(id);
	alarm(0);
	abort_uploads();
	sync();
	reboot(how == 1 ? RB_AUTOBOOT : RB_POWER_OFF);
	logmsg("reboot: %s", strerror(errno));
	g.alarm_fired = 0;
	fcntl(g.ctl, F_SETFL, fl);
}

static void handle_add_entropy(uint32_t id, const unsigned char *p, size_t len)
{
	struct pool { /* struct rand_pool_info */
		int entropy_count;
		int buf_size;
		unsigned char buf[];
	} *pool = NULL;
	int fd = -1;
	if (len == 0) {
		send_error(id, EINVAL, "add_entropy: no data");
	} else if (!(pool = malloc(sizeof *pool + len + 4))) {
		send_error(id, ENOMEM, "add_entropy: out of memory");
	} else if ((fd = open("/dev/random", O_WRONLY | O_CLOEXEC)) < 0) {
		send_error(id, errno, "add_entropy: open /dev/random: %s", strerror(errno));
	} else {
		pool->entropy_count = (int)(len * 8);
		pool->buf_size = (int)len;
		memcpy(pool->buf, p, len);
		if (ioctl(fd, RNDADDENTROPY, pool) < 0)
			send_error(id, errno, "add_entropy: RNDADDENTROPY: %s", strerror(errno));
		else if (ioctl(fd, RNDRESEEDCRNG) < 0 && errno != EINVAL && errno != ENOTTY)
			send_error(id, errno, "add_entropy: RNDRESEEDCRNG: %s", strerror(errno));
		else
			send_ok(id); /* kernels before 4.17 lack RNDRESEEDCRNG; the entropy counts */
	}
	if (fd >= 0)
		close(fd);
	free(pool);
}

static int ifreq_ioctl(int sock, unsigned long req, const char *ifname, struct ifreq *ifr);

/* SET_IDENTITY's names: what the host allows (protocol.py HOSTNAME_RE, IFNAME_RE):
 * 1..max bytes of [A-Za-z0-9_.-], the first a letter or digit. */
static int name_ok(const unsigned char *s, size_t n, size_t max)
{
	if (n < 1 || n > max || !((s[0] >= 'a' && s[0] <= 'z') || (s[0] >= 'A' && s[0] <= 'Z') ||
				  (s[0] >= '0' && s[0] <= '9')))
		return 0;
	for (size_t i = 0; i < n; i++) {
		unsigned char c = s[i];
		if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
		      c == '_' || c == '.' || c == '-'))
			return 0;
	}
	return 1;
}

/* SET_IDENTITY: hostname by sethostname(2), the MAC of one interface by
 * SIOCSIFHWADDR -- no process is started, so a fork's first exec is not on its
 * path. virtio-net changes its address live (IFF_LIVE_ADDR_CHANGE); a NIC that
 * wants its link down first answers EBUSY, reported as is. The OK carries what
 * the guest has now, read back. Init mode only: in host mode this would rename
 * the host. */
static void handle_set_identity(uint32_t id, struct rd *r)
{
	size_t hn = 0, in = 0, mn = 0;
	const unsigned char *host = rd_bytes(r, &hn);
	const unsigned char *ifn = rd_bytes(r, &in);
	const unsigned char *mac = rd_bytes(r, &mn);
	if (!rd_done(r)) {
		send_malformed(id, "SET_IDENTITY", r);
		return;
	}
	int bad_mac = mn && (mn != 6 || (mac[0] & 1) || !memcmp(mac, "\0\0\0\0\0\0", 6));
	if (!name_ok(host, hn, 64) || (in != 0) != (mn != 0) ||
	    (in && !name_ok(ifn, in, IFNAMSIZ - 1)) || bad_mac) {
		send_error(id, EINVAL, "set_identity: bad hostname, interface name or MAC");
		return;
	}
	if (!g.init_mode) {
		send_error(id, EPERM, "set_identity: only the guest's init sets the identity");
		return;
	}
	if (sethostname((const char *)host, hn) < 0) {
		send_error(id, errno, "set_identity: sethostname: %s", strerror(errno));
		return;
	}
	struct utsname u;
	uname(&u);
	struct wbuf w = { .len = 0 };
	wb_str(&w, u.nodename, strnlen(u.nodename, sizeof u.nodename));
	if (!mn) {
		wb_str(&w, "", 0);
		send_wbuf(T_OK, id, &w);
		return;
	}
	char name[IFNAMSIZ] = { 0 };
	memcpy(name, ifn, in);
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	ifr.ifr_hwaddr.sa_family = 1; /* ARPHRD_ETHER */
	memcpy(ifr.ifr_hwaddr.sa_data, mac, 6);
	const char *step = "socket";
	int ok = s >= 0;
	if (ok) {
		step = "SIOCSIFHWADDR";
		ok = ifreq_ioctl(s, SIOCSIFHWADDR, name, &ifr) == 0;
	}
	if (ok) {
		step = "SIOCGIFHWADDR";
		memset(&ifr, 0, sizeof ifr);
		ok = ifreq_ioctl(s, SIOCGIFHWADDR, name, &ifr) == 0;
	}
	int err = errno;
	if (s >= 0)
		close(s);
	if (!ok) {
		send_error(id, err, "set_identity: %s %s: %s", name, step, strerror(err));
		return;
	}
	wb_str(&w, ifr.ifr_hwaddr.sa_data, 6);
	send_wbuf(T_OK, id, &w);
}

static void handle_frame(uint8_t type, uint32_t id, const unsigned char *p, uint32_t len)
{
	struct rd r = { .p = p, .len = len };
	if (id == 0) { /* id 0 is reserved for the resynchronisation ERROR */
		send_error(0, EINVAL, "request id 0 is reserved");
		return;
	}
	/* Replies to a new request must not mix with those of a running one,
	 * e.g. an EXEC started by an earlier host connection. */
	if (type != T_STDIN && type != T_SIGNAL && type != T_RESIZE &&
	    (find_exec(id) || find_upload(id))) {
		send_error(id, EBUSY, "request id %u is still in use", id);
		return;
	}
	switch (type) {
	case T_HELLO: handle_hello(id, &r); break;
	case T_EXEC: handle_exec(id, &r); break;
	case T_STDIN: handle_stdin(id, p, len); break;
	case T_SIGNAL: handle_signal(id, &r); break;
	case T_RESIZE: handle_resize(id, &r); break;
	case T_READ_FILE: handle_read_file(id, &r); break;
	case T_WRITE_FILE: handle_write_file(id, &r); break;
	case T_STAT: handle_stat(id, &r); break;
	case T_LIST_DIR: handle_list_dir(id, &r); break;
	case T_MKDIR: handle_mkdir(id, &r); break;
	case T_SYMLINK: handle_symlink(id, &r); break;
	case T_SET_TIME: handle_set_time(id, &r); break;
	case T_SYNC:
		if (!rd_done(&r)) {
			send_malformed(id, "SYNC", &r);
			break;
		}
		sync();
		send_ok(id);
		break;
	case T_SHUTDOWN: handle_shutdown(id, &r); break;
	case T_ADD_ENTROPY: handle_add_entropy(id, p, len); break;
	case T_SET_IDENTITY: handle_set_identity(id, &r); break;
	default: send_error(id, ENOSYS, "unknown request type 0x%02x", type); break;
	}
}

/* ---- control input ----------------------------------------------------- */

static void consume(size_t n)
{
	g.in_off += n;
	g.in_len -= n;
}

static void reset_input(void)
{
	g.in_off = g.in_len = 0;
	g.discard = 0;
	g.resyncing = 0;
	abort_uploads(); /* nobody will send their final STDIN */
}

/* A header is bad if its magic or its reserved flags byte is wrong, or if it
 * claims an oversized payload while we are resynchronising: random bytes that
 * happen to contain the magic must not make us skip up to 4 GiB of the stream.
 * Only a header that follows a good frame earns the EMSGSIZE discard. */
static int header_bad(const unsigned char *p, size_t avail)
{
	return p[0] != MAGIC_LO || (avail > 1 && p[1] != MAGIC_HI) || (avail > 3 && p[3] != 0) ||
	       (g.resyncing && avail >= HDR_LEN && get_u32(p + 8) > MAX_PAYLOAD);
}

static void process_input(void)
{
	for (;;) {
		if (g.discard > 0) {
			size_t n = g.discard < g.in_len ? (size_t)g.discard : g.in_len;
			consume(n);
			g.discard -= n;
			if (g.discard > 0)
				return;
		}
		const unsigned char *p = g.in + g.in_off;
		size_t avail = g.in_len;
		if (avail == 0)
			return;
		if (header_bad(p, avail)) {
			if (!g.resyncing) {
				g.resyncing = 1;
				send_error(0, EPROTO, "bad frame header; skipping to the next magic");
			}
			size_t skip = 1;
			while (skip < avail &&
			       !(p[skip] == MAGIC_LO && (skip + 1 == avail || p[skip + 1] == MAGIC_HI)))
				skip++;
			consume(skip);
			continue;
		}
		if (avail < HDR_LEN)
			return;
		uint8_t type = p[2];
		uint32_t id = get_u32(p + 4), len = get_u32(p + 8);
		g.resyncing = 0;
		if (len > MAX_PAYLOAD) {
			consume(HDR_LEN);
			g.discard = len;
			send_error(id, EMSGSIZE, "payload of %u bytes exceeds %u", len, MAX_PAYLOAD);
			continue;
		}
		if (avail < HDR_LEN + (size_t)len)
			return;
		handle_frame(type, id, p + HDR_LEN, len);
		consume(HDR_LEN + len);
	}
}

static void read_ctl(void)
{
	if (g.in_off > 0) {
		memmove(g.in, g.in + g.in_off, g.in_len);
		g.in_off = 0;
	}
	ssize_t n = read(g.ctl, g.in + g.in_len, IN_CAP - g.in_len);
	if (n > 0) {
		if (!g.connected)
			logmsg("host connected");
		g.connected = g.seen_host = 1;
		g.in_len += (size_t)n;
		process_input();
		return;
	}
	if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
		if (!g.connected && g.seen_host)
			logmsg("host connected");
		g.connected = 1; /* a port with no host reads as EOF, not EAGAIN */
		return;
	}
	/* EOF (or EIO): no host. A partial frame from the old one is garbage. */
	const char *why = n == 0 ? "EOF" : strerror(errno);
	reset_input();
	host_gone(why);
	int64_t now = now_ms();
	g.retry_at_ms = now + (now - g.down_since_ms < 1000 ? 1 : 20);
}

/* ---- the loop ---------------------------------------------------------- */

static void serve(void)
{
	static struct pollfd pfd[2 + 3 * MAX_EXECS];
	static struct { struct exec_proc *e; int which; } slot[2 + 3 * MAX_EXECS];
	for (;;) {
		int n = 0, ctl_idx = -1;
		int64_t timeout = out_flush_due(); /* ns; -1 for none */
		pfd[n++] = (struct pollfd){ .fd = g.sigfd, .events = POLLIN };
		if (!g.connected) {
			int64_t wait = (g.retry_at_ms - now_ms()) * 1000000;
			if (wait < 0)
				wait = 0;
			if (timeout < 0 || wait < timeout)
				timeout = wait;
		} else if (g.stdin_pending < STDIN_HIGH_WATER) {
			ctl_idx = n;
			pfd[n++] = (struct pollfd){ .fd = g.ctl, .events = POLLIN };
		}
		for (int i = 0; i < g.nexecs; i++) {
			struct exec_proc *e = g.execs[i];
			int fds[3] = { e->out[PIPE_OUT].fd, e->out[PIPE_ERR].fd,
				       e->in_off < e->in_len ? e->in_fd : -1 };
			for (int k = 0; k < 3; k++) {
				if (fds[k] < 0)
					continue;
				slot[n].e = e;
				slot[n].which = k;
				pfd[n++] = (struct pollfd){ .fd = fds[k],
							    .events = k == PIPE_IN ? POLLOUT : POLLIN };
			}
		}
		/* ppoll: poll() with a timeout fine enough for FLUSH_DELAY_MS */
		struct timespec ts = { (time_t)(timeout / 1000000000), (long)(timeout % 1000000000) };
		if (ppoll(pfd, (nfds_t)n, timeout < 0 ? NULL : &ts, NULL) < 0) {
			if (errno != EINTR) {
				logmsg("ppoll: %s", strerror(errno));
				sleep_ms(10);
			}
			continue;
		}
		/* Pipes first: reaping (last) removes execs that slot[] points to. */
		for (int i = 0; i < n; i++) {
			if (!pfd[i].revents || i == 0 || i == ctl_idx)
				continue;
			struct exec_proc *e = slot[i].e;
			if (slot[i].which == PIPE_IN)
				stdin_flush(e);
			else /* one read per wake-up keeps the loop fair */
				out_read(e, slot[i].which, OUT_CHUNK);
		}
		if (ctl_idx >= 0 && pfd[ctl_idx].revents)
			read_ctl();
		else if (!g.connected && now_ms() >= g.retry_at_ms)
			read_ctl();
		if (pfd[0].revents)
			reap_children();
	}
}

/* ---- init mode: PID 1 -------------------------------------------------- */

struct boot_config {
	char root[256], fstype[64], hostname[65], ip[64], gw[64], dns[64];
	int net;
};

static void __attribute__((noreturn)) power_off(void)
{
	sync();
	reboot(RB_POWER_OFF);
	logmsg("power off failed: %s", strerror(errno));
	for (;;)
		pause(); /* PID 1 exiting would panic the kernel */
}

static int mount_fs(const char *src, const char *target, const char *type, unsigned long flags,
		    const char *data)
{
	if (mkdir(target, 0755) < 0 && errno != EEXIST)
		logmsg("mkdir %s: %s", target, strerror(errno));
	if (mount(src, target, type, flags, data) < 0 && errno != EBUSY) {
		logmsg("mount %s on %s: %s", type, target, strerror(errno));
		return -1;
	}
	return 0;
}

static char cmdline[4096]; /* /proc/cmdline, read once at boot */

static void read_cmdline(void)
{
	int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
	ssize_t n = fd >= 0 ? read(fd, cmdline, sizeof cmdline - 1) : -1;
	if (n < 0)
		logmsg("read /proc/cmdline: %s", strerror(errno));
	cmdline[n > 0 ? n : 0] = '\0';
	if (fd >= 0)
		close(fd);
}

/* Like modprobe, turn "virtio_mmio.device=X" on the kernel command line into
 * the parameter "device=X" of virtio_mmio.ko: the kernel only applies such
 * parameters itself to built-in code. */
static void module_params(const char *file, char *out, size_t size)
{
	char mod[128];
	const char *base = strrchr(file, '/');
	snprintf(mod, sizeof mod, "%s", base ? base + 1 : file);
	mod[strcspn(mod, ".")] = '\0';
	for (char *c = mod; *c; c++)
		if (*c == '-')
			*c = '_';
	size_t mlen = strlen(mod), n = 0;
	out[0] = '\0';
	for (const char *t = cmdline; *(t += strspn(t, " \t\n"));) {
		size_t len = strcspn(t, " \t\n");
		if (len > mlen + 1 && !strncmp(t, mod, mlen) && t[mlen] == '.' && n + len < size)
			n += (size_t)snprintf(out + n, size - n, "%s%.*s", n ? " " : "",
					      (int)(len - mlen - 1), t + mlen + 1);
		t += len;
	}
}

static void load_modules(void)
{
	FILE *f = fopen("/torpor/modules", "re");
	if (!f) {
		if (errno != ENOENT)
			logmsg("open /torpor/modules: %s", strerror(errno));
		return;
	}
	char line[256], path[300], params[1024];
	while (fgets(line, sizeof line, f)) {
		char *name = line + strspn(line, " \t");
		name[strcspn(name, " \t\r\n")] = '\0';
		if (!*name || *name == '#')
			continue;
		snprintf(path, sizeof path, "/torpor/modules.d/%s", name);
		module_params(name, params, sizeof params);
		int fd = open(path, O_RDONLY | O_CLOEXEC);
		if (fd < 0) {
			logmsg("module %s: %s", path, strerror(errno));
			continue;
		}
		if (syscall(SYS_finit_module, fd, params, 0) < 0 && errno != EEXIST)
			logmsg("finit_module %s: %s", path, strerror(errno));
		close(fd);
	}
	fclose(f);
}

static void copy_opt(char *dst, size_t size, const char *src, const char *key)
{
	if (snprintf(dst, size, "%s", src) >= (int)size)
		logmsg("%s: value too long, truncated", key);
}

/* Values are single words: torpor never quotes them on the kernel command line. */
static void parse_cmdline(struct boot_config *c)
{
	*c = (struct boot_config){ .root = "/dev/vda", .fstype = "ext4", .ip = "10.0.2.15/24",
				   .gw = "10.0.2.2", .dns = "10.0.2.3" };
	char buf[sizeof cmdline];
	memcpy(buf, cmdline, sizeof buf);
	static const struct { const char *key; size_t off, size; } opts[] = {
		{ "torpor.root=", offsetof(struct boot_config, root), sizeof c->root },
		{ "torpor.rootfstype=", offsetof(struct boot_config, fstype), sizeof c->fstype },
		{ "torpor.hostname=", offsetof(struct boot_config, hostname), sizeof c->hostname },
		{ "torpor.ip=", offsetof(struct boot_config, ip), sizeof c->ip },
		{ "torpor.gw=", offsetof(struct boot_config, gw), sizeof c->gw },
		{ "torpor.dns=", offsetof(struct boot_config, dns), sizeof c->dns },
	};
	for (char *tok = strtok(buf, " \t\n"); tok; tok = strtok(NULL, " \t\n")) {
		if (!strcmp(tok, "torpor.net=1"))
			c->net = 1;
		for (size_t i = 0; i < sizeof opts / sizeof opts[0]; i++) {
			size_t kl = strlen(opts[i].key);
			if (!strncmp(tok, opts[i].key, kl))
				copy_opt((char *)c + opts[i].off, opts[i].size, tok + kl, opts[i].key);
		}
	}
}

static int wait_for_block_device(const char *dev, int timeout_ms)
{
	int64_t deadline = now_ms() + timeout_ms;
	struct stat st;
	while (stat(dev, &st) < 0 || !S_ISBLK(st.st_mode)) {
		if (now_ms() >= deadline)
			return -1;
		sleep_ms(5);
	}
	return 0;
}

/* Mounts the root disk and makes it "/". Any failure here is fatal. */
static void switch_root(const struct boot_config *c)
{
	if (wait_for_block_device(c->root, 10000) < 0) {
		logmsg("root device %s did not appear within 10 s", c->root);
		power_off();
	}
	if (mkdir("/newroot", 0755) < 0 && errno != EEXIST)
		logmsg("mkdir /newroot: %s", strerror(errno));
	if (mount(c->root, "/newroot", c->fstype, 0, NULL) < 0) {
		logmsg("mount %s (%s) on /newroot: %s", c->root, c->fstype, strerror(errno));
		power_off();
	}
	/* The initramfs mounts would linger, hidden, in the mount table. */
	umount2("/proc", MNT_DETACH);
	umount2("/sys", MNT_DETACH);
	umount2("/dev", MNT_DETACH);
	if (chdir("/newroot") < 0 || mount(".", "/", NULL, MS_MOVE, NULL) < 0 || chroot(".") < 0 ||
	    chdir("/") < 0) {
		logmsg("switching to the root filesystem: %s", strerror(errno));
		power_off();
	}
}

static void mount_api_filesystems(void)
{
	mount_fs("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_fs("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_fs("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	mount_fs("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
		 "newinstance,ptmxmode=0666,mode=0620,gid=5");
	mount_fs("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
	mount_fs("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=755");
	struct stat st;
	if (stat("/tmp", &st) < 0) {
		if (mkdir("/tmp", 01777) < 0 || chmod("/tmp", 01777) < 0) /* chmod: umask */
			logmsg("mkdir /tmp: %s", strerror(errno));
	}
}

static int ifreq_ioctl(int sock, unsigned long req, const char *ifname, struct ifreq *ifr)
{
	snprintf(ifr->ifr_name, IFNAMSIZ, "%s", ifname);
	return ioctl(sock, req, ifr);
}

static int if_up(int sock, const char *ifname)
{
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	if (ifreq_ioctl(sock, SIOCGIFFLAGS, ifname, &ifr) < 0)
		return -1;
	ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
	return ifreq_ioctl(sock, SIOCSIFFLAGS, ifname, &ifr);
}

static int set_if_addr(int sock, unsigned long req, const char *ifname, struct in_addr a)
{
	struct ifreq ifr;
	struct sockaddr_in sin = { .sin_family = AF_INET, .sin_addr = a };
	memset(&ifr, 0, sizeof ifr);
	memcpy(&ifr.ifr_addr, &sin, sizeof sin);
	return ifreq_ioctl(sock, req, ifname, &ifr);
}

static void write_resolv_conf(const char *dns)
{
	char text[128];
	int n = snprintf(text, sizeof text, "nameserver %s\n", dns);
	int fd = open("/etc/resolv.conf", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
	struct stat st;
	if (fd < 0 && lstat("/etc/resolv.conf", &st) == 0 && S_ISLNK(st.st_mode)) {
		/* e.g. a dangling link into systemd-resolved's /run directory */
		unlink("/etc/resolv.conf");
		fd = open("/etc/resolv.conf", O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
	}
	if (fd < 0 || write_all(fd, text, (size_t)n) < 0)
		logmsg("write /etc/resolv.conf: %s", strerror(errno));
	if (fd >= 0)
		close(fd);
}

static void setup_network(const struct boot_config *c)
{
	int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (s < 0) {
		logmsg("socket: %s", strerror(errno));
		return;
	}
	if (if_up(s, "lo") < 0)
		logmsg("bring up lo: %s", strerror(errno));
	if (!c->net) {
		close(s);
		return;
	}
	char ip[64];
	snprintf(ip, sizeof ip, "%s", c->ip);
	char *slash = strchr(ip, '/');
	int prefix = 24;
	if (slash) {
		*slash = '\0';
		prefix = atoi(slash + 1);
	}
	struct in_addr addr, mask, gw;
	if (inet_pton(AF_INET, ip, &addr) != 1 || prefix < 0 || prefix > 32) {
		logmsg("torpor.ip=%s is not an IPv4 address/prefix", c->ip);
		close(s);
		return;
	}
	mask.s_addr = htonl(prefix ? 0xFFFFFFFFu << (32 - prefix) : 0);
	/* virtio-net registers eth0 while its module loads, but allow for a lag */
	struct ifreq probe;
	int64_t deadline = now_ms() + 2000;
	while (ifreq_ioctl(s, SIOCGIFFLAGS, "eth0", &probe) < 0 && now_ms() < deadline)
		sleep_ms(10);
	if (set_if_addr(s, SIOCSIFADDR, "eth0", addr) < 0 ||
	    set_if_addr(s, SIOCSIFNETMASK, "eth0", mask) < 0 || if_up(s, "eth0") < 0) {
		logmsg("configure eth0 (%s): %s", c->ip, strerror(errno));
		close(s);
		return;
	}
	if (inet_pton(AF_INET, c->gw, &gw) != 1) {
		logmsg("torpor.gw=%s is not an IPv4 address", c->gw);
	} else {
		struct rtentry rt;
		struct sockaddr_in any = { .sin_family = AF_INET }, via = any;
		via.sin_addr = gw;
		memset(&rt, 0, sizeof rt);
		memcpy(&rt.rt_dst, &any, sizeof any);
		memcpy(&rt.rt_genmask, &any, sizeof any);
		memcpy(&rt.rt_gateway, &via, sizeof via);
		rt.rt_flags = RTF_UP | RTF_GATEWAY;
		if (ioctl(s, SIOCADDRT, &rt) < 0 && errno != EEXIST)
			logmsg("default route via %s: %s", c->gw, strerror(errno));
	}
	close(s);
	write_resolv_conf(c->dns);
}

static void init_system(void)
{
	umask(022);
	mount_fs("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");
	ensure_std_fds(); /* first, so the console cannot land on fd 0-2 */
	int con = open("/dev/console", O_WRONLY | O_NOCTTY | O_CLOEXEC);
	if (con >= 0)
		log_fd = con;
	mount_fs("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	mount_fs("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL);
	read_cmdline();
	load_modules();
	struct boot_config c;
	parse_cmdline(&c);
	switch_root(&c);
	mount_api_filesystems();
	if (c.hostname[0] && sethostname(c.hostname, strlen(c.hostname)) < 0)
		logmsg("sethostname %s: %s", c.hostname, strerror(errno));
	setup_network(&c);
}

/* The port shows up in sysfs when virtio_console binds; its /dev node follows. */
static int open_control_port(void)
{
	for (long tries = 0;; tries++) {
		DIR *d = opendir("/sys/class/virtio-ports");
		struct dirent *de;
		while (d && (de = readdir(d))) {
			char path[512], name[64] = "";
			if (de->d_name[0] == '.')
				continue;
			snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", de->d_name);
			int fd = open(path, O_RDONLY | O_CLOEXEC);
			ssize_t n = fd >= 0 ? read(fd, name, sizeof name - 1) : -1;
			if (fd >= 0)
				close(fd);
			if (n <= 0)
				continue;
			name[n] = '\0';
			name[strcspn(name, "\n")] = '\0';
			if (strcmp(name, "torpor.ctl") != 0)
				continue;
			snprintf(path, sizeof path, "/dev/%s", de->d_name);
			fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
			if (fd >= 0) {
				closedir(d);
				return fd;
			}
		}
		if (d)
			closedir(d);
		if (tries % 1000 == 200)
			logmsg("waiting for virtio-serial port torpor.ctl");
		sleep_ms(10);
	}
}

/* ---- main -------------------------------------------------------------- */

static void usage(void)
{
	fprintf(stderr, "usage: torpor-agent --fd N | --version\n"
			"  (as PID 1 it boots the VM and serves the torpor.ctl port)\n");
	exit(2);
}

int main(int argc, char **argv)
{
	if (getpid() == 1) {
		g.init_mode = 1;
		init_system();
		g.ctl = open_control_port();
	} else {
		if (argc == 2 && !strcmp(argv[1], "--version")) {
			printf("torpor-agent %s (protocol %d)\n", AGENT_VERSION, PROTOCOL_VERSION);
			return 0;
		}
		uint32_t fd;
		if (argc != 3 || strcmp(argv[1], "--fd") != 0 || !parse_id(argv[2], &fd) || fd > INT_MAX)
			usage();
		g.ctl = (int)fd;
		if (fcntl(g.ctl, F_SETFD, FD_CLOEXEC) < 0) {
			logmsg("--fd %d: %s", g.ctl, strerror(errno));
			return 2;
		}
		ensure_std_fds();
		/* Orphans are re-parented to us, as they would be to PID 1. */
		prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
	}
	set_nonblock(g.ctl);
	signal(SIGPIPE, SIG_IGN); /* a vanished reader is an EPIPE, not a death */
	sigset_t chld;
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, NULL);
	g.sigfd = signalfd(-1, &chld, SFD_NONBLOCK | SFD_CLOEXEC);
	g.in = malloc(IN_CAP);
	if (g.sigfd < 0 || !g.in) {
		logmsg("start-up: %s", strerror(errno));
		if (g.init_mode)
			power_off();
		return 1;
	}
	serve();
	return 0;
}
