/*
 * LD_PRELOAD shim that runs a process's clocks fast or slow, for quorumlock's test
 * fixture (src/testing/clock.rs compiles it). libfaketime is not used: it hangs
 * redis-server through a clash with its jemalloc.
 *
 *   virtual = anchor_virtual + (real - anchor_real) * rate   (+ offset, wall clocks)
 *
 * Wall clocks (CLOCK_REALTIME, _COARSE, _ALARM, CLOCK_TAI) and monotonic ones
 * (CLOCK_MONOTONIC, _RAW, _COARSE, CLOCK_BOOTTIME, _ALARM) are scaled, each from its
 * own anchor; CPU-time clocks pass through. The offset (ms) shifts the wall clocks only:
 * a step of the wall clock is what NTP does to a real server, while a monotonic clock
 * that goes back breaks the host's elapsed-time arithmetic.
 *
 * Settings: QUORUMLOCK_CLOCK_RATE and QUORUMLOCK_CLOCK_OFFSET_MS at load, then the file
 * named by QUORUMLOCK_CLOCK_CONTROL, "rate [offset_ms]" (no offset means 0), re-read at
 * most every 10 ms of each clock's real time. A rate change re-anchors every clock at
 * its current virtual time, so time stays continuous. Bad settings are ignored: the
 * last good ones stay (rate 1, offset 0 at load).
 *
 * Rules that keep the host alive:
 * - Real time comes from the raw syscall. Calling glibc's clock_gettime would need
 *   dlsym(RTLD_NEXT), which may allocate, and an allocator that reads the clock under
 *   its own lock (jemalloc does) then re-enters us: the kind of clash that hangs
 *   libfaketime.
 * - Nothing here allocates, blocks or uses stdio: the clock is read under the
 *   allocator's locks, from background threads and from signal handlers.
 * - Readers never wait. The settings live in immutable snapshots published through
 *   one atomic pointer; a writer that finds another one at work just skips its turn.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define NCLOCKS 12 /* clock ids 0 (CLOCK_REALTIME) .. 11 (CLOCK_TAI) */
#define NS_PER_S 1000000000LL
#define CHECK_EVERY_NS 10000000LL
/* Same limits as clock.rs; they keep (real - anchor) * rate far from overflow. */
#define MIN_RATE 1e-3
#define MAX_RATE 1e3
#define MAX_OFFSET_MS 1000000000000LL
/*
 * Snapshots are reused round-robin. A reader holds one for nanoseconds, and each
 * publication needs a changed control file seen by a poll (at most one per clock per
 * 10 ms), so a slot is overwritten under a reader only if that reader stalls through
 * hundreds of changes.
 */
#define SNAPSHOTS 256

enum kind { PASS, WALL, MONO };

struct snapshot {
    double rate;
    int64_t offset_ns;
    int64_t anchor_real[NCLOCKS];
    int64_t anchor_virtual[NCLOCKS]; /* without the offset */
};

static struct snapshot ring[SNAPSHOTS];
static unsigned next_slot;                  /* owned by whoever holds `writing` */
static _Atomic(const struct snapshot *) current;
static atomic_flag writing = ATOMIC_FLAG_INIT;
static atomic_int init_state;               /* 0 not started, 1 running, 2 done */
static _Atomic int64_t next_check[NCLOCKS]; /* per clock: each compares its own time */
/* Publishing is not instantaneous: a thread still on the old snapshot can be ahead. */
static _Atomic int64_t high_water[NCLOCKS];
/* A copy: redis-server's setproctitle() overwrites the environment strings. */
static char control_path[4096];

static enum kind kind_of(clockid_t id) {
    switch (id) {
    case CLOCK_REALTIME:
    case CLOCK_REALTIME_COARSE:
    case CLOCK_REALTIME_ALARM:
    case CLOCK_TAI:
        return WALL;
    case CLOCK_MONOTONIC:
    case CLOCK_MONOTONIC_RAW:
    case CLOCK_MONOTONIC_COARSE:
    case CLOCK_BOOTTIME:
    case CLOCK_BOOTTIME_ALARM:
        return MONO;
    default: /* CPU-time clocks, including the negative per-process/thread ids */
        return PASS;
    }
}

static int read_real(clockid_t id, int64_t *ns) {
    struct timespec ts;
    if (syscall(SYS_clock_gettime, id, &ts) != 0)
        return -1;
    *ns = (int64_t)ts.tv_sec * NS_PER_S + ts.tv_nsec;
    return 0;
}

static int64_t saturating_add(int64_t a, int64_t b) {
    if (b > 0 && a > INT64_MAX - b)
        return INT64_MAX;
    if (b < 0 && a < INT64_MIN - b)
        return INT64_MIN;
    return a + b;
}

/* Monotone in `real`: conversion, multiplication by rate > 0 and truncation all are. */
static int64_t scaled(const struct snapshot *s, int c, int64_t real) {
    double delta = (double)(real - s->anchor_real[c]) * s->rate;
    if (delta > 4e18)
        delta = 4e18;
    if (delta < -4e18)
        delta = -4e18;
    return saturating_add(s->anchor_virtual[c], (int64_t)delta);
}

/* Must be called by the only writer: `writing` held, or during init. */
static void publish(double rate, int64_t offset_ns) {
    const struct snapshot *old = atomic_load_explicit(&current, memory_order_acquire);
    struct snapshot *s = &ring[next_slot++ % SNAPSHOTS];
    s->rate = rate;
    s->offset_ns = offset_ns;
    for (int c = 0; c < NCLOCKS; c++) {
        int64_t real = 0;
        /* A clock the kernel lacks fails here and in every later read: no anchor. */
        if (kind_of(c) == PASS || read_real(c, &real) != 0) {
            s->anchor_real[c] = s->anchor_virtual[c] = 0;
            continue;
        }
        s->anchor_real[c] = real;
        s->anchor_virtual[c] = old ? scaled(old, c, real) : real;
    }
    atomic_store_explicit(&current, s, memory_order_release);
}

static const char *skip_blanks(const char *p) {
    while (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r')
        p++;
    return p;
}

/* digits[.digits], as Rust's `{}` prints an f64 in our range (never an exponent). */
static const char *parse_rate(const char *p, double *rate) {
    double mantissa = 0, scale = 1;
    int digits = 0, decimals = 0;
    for (; *p >= '0' && *p <= '9'; p++, digits++)
        mantissa = mantissa * 10 + (*p - '0');
    if (*p == '.')
        for (p++; *p >= '0' && *p <= '9'; p++, digits++, decimals++)
            mantissa = mantissa * 10 + (*p - '0');
    if (digits == 0 || digits > 40)
        return NULL;
    while (decimals-- > 0)
        scale *= 10;
    *rate = mantissa / scale;
    return *rate >= MIN_RATE && *rate <= MAX_RATE ? p : NULL;
}

static const char *parse_offset(const char *p, int64_t *offset_ns) {
    int negative = *p == '-';
    int64_t ms = 0;
    int digits = 0;
    if (*p == '-' || *p == '+')
        p++;
    for (; *p >= '0' && *p <= '9'; p++)
        if (++digits > 13) /* more than MAX_OFFSET_MS can hold */
            return NULL;
        else
            ms = ms * 10 + (*p - '0');
    if (digits == 0 || ms > MAX_OFFSET_MS)
        return NULL;
    *offset_ns = (negative ? -ms : ms) * 1000000;
    return p;
}

/* "rate [offset_ms]" with blanks around; anything else is rejected whole. */
static int parse_control(const char *text, double *rate, int64_t *offset_ns) {
    const char *p = parse_rate(skip_blanks(text), rate);
    if (!p)
        return 0;
    p = skip_blanks(p);
    *offset_ns = 0;
    if (*p && !(p = parse_offset(p, offset_ns)))
        return 0;
    return *skip_blanks(p) == '\0';
}

static int read_control(double *rate, int64_t *offset_ns) {
    /* One byte more than a valid file needs: a longer file is rejected, not cut. */
    char text[129];
    /* Raw syscalls: unlike libc's open/read, they are not pthread cancellation points,
     * so a cancelled thread cannot leave `writing` held. */
    long fd = syscall(SYS_openat, AT_FDCWD, control_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    long n = syscall(SYS_read, fd, text, sizeof text - 1);
    syscall(SYS_close, fd);
    if (n <= 0 || n >= (long)sizeof text - 1)
        return 0;
    text[n] = '\0';
    return parse_control(text, rate, offset_ns);
}

static void poll_control(int c, int64_t real) {
    if (atomic_flag_test_and_set_explicit(&writing, memory_order_acquire))
        return;
    int saved_errno = errno; /* our callers only set errno on their own failures */
    atomic_store_explicit(&next_check[c], real + CHECK_EVERY_NS, memory_order_relaxed);
    const struct snapshot *s = atomic_load_explicit(&current, memory_order_acquire);
    double rate;
    int64_t offset_ns;
    if (read_control(&rate, &offset_ns) && (rate != s->rate || offset_ns != s->offset_ns))
        publish(rate, offset_ns);
    errno = saved_errno;
    atomic_flag_clear_explicit(&writing, memory_order_release);
}

static void init(void) {
    int expected = 0;
    if (!atomic_compare_exchange_strong(&init_state, &expected, 1))
        return;
    int saved_errno = errno;
    double rate = 1, parsed_rate;
    int64_t offset_ns = 0, parsed_offset;
    const char *text = getenv("QUORUMLOCK_CLOCK_RATE");
    const char *end;
    if (text && (end = parse_rate(skip_blanks(text), &parsed_rate)) && !*skip_blanks(end))
        rate = parsed_rate;
    text = getenv("QUORUMLOCK_CLOCK_OFFSET_MS");
    if (text && (end = parse_offset(skip_blanks(text), &parsed_offset)) && !*skip_blanks(end))
        offset_ns = parsed_offset;
    text = getenv("QUORUMLOCK_CLOCK_CONTROL");
    int controlled = text && *text && strlen(text) < sizeof control_path;
    if (controlled)
        memcpy(control_path, text, strlen(text) + 1);
    for (int c = 0; c < NCLOCKS; c++)
        atomic_store(&next_check[c], controlled ? INT64_MIN : INT64_MAX);
    publish(rate, offset_ns);
    errno = saved_errno;
    atomic_store_explicit(&init_state, 2, memory_order_release);
}

/* Also run lazily: another library's constructor may read the clock before ours. */
__attribute__((constructor)) static void on_load(void) { init(); }

static int64_t virtual_ns(clockid_t id, int64_t real) {
    enum kind kind = kind_of(id);
    if (kind == PASS)
        return real;
    if (atomic_load_explicit(&init_state, memory_order_acquire) != 2) {
        init();
        /* Only while another thread is still initialising: real time, briefly. */
        if (atomic_load_explicit(&init_state, memory_order_acquire) != 2)
            return real;
    }
    int c = (int)id;
    if (real >= atomic_load_explicit(&next_check[c], memory_order_relaxed))
        poll_control(c, real);
    const struct snapshot *s = atomic_load_explicit(&current, memory_order_acquire);
    int64_t v = scaled(s, c, real);
    if (kind == WALL)
        return saturating_add(v, s->offset_ns);
    int64_t seen = atomic_load_explicit(&high_water[c], memory_order_relaxed);
    while (v > seen && !atomic_compare_exchange_weak_explicit(&high_water[c], &seen, v,
                                                              memory_order_relaxed,
                                                              memory_order_relaxed)) {
    }
    return v > seen ? v : seen;
}

static void split(int64_t ns, int64_t *seconds, int64_t *rest) {
    *seconds = ns / NS_PER_S;
    *rest = ns % NS_PER_S;
    if (*rest < 0) { /* floor, so that the fraction stays in [0, 1 s) */
        *seconds -= 1;
        *rest += NS_PER_S;
    }
}

int clock_gettime(clockid_t id, struct timespec *tp) {
    int64_t real, seconds, rest;
    if (read_real(id, &real) != 0)
        return -1;
    split(virtual_ns(id, real), &seconds, &rest);
    tp->tv_sec = (time_t)seconds;
    tp->tv_nsec = (long)rest;
    return 0;
}

int gettimeofday(struct timeval *restrict tv, void *restrict tz) {
    int64_t real, seconds, rest;
    /* glibc declares `tv` nonnull, so a plain test would be optimised away, but Linux
     * accepts NULL and some callers rely on it. */
    struct timeval *volatile out = tv;
    if (tz) /* obsolete; Linux reports UTC unless someone called settimeofday */
        memset(tz, 0, sizeof(struct timezone));
    if (!out)
        return 0;
    if (read_real(CLOCK_REALTIME, &real) != 0)
        return -1;
    split(virtual_ns(CLOCK_REALTIME, real), &seconds, &rest);
    tv->tv_sec = (time_t)seconds;
    tv->tv_usec = (suseconds_t)(rest / 1000);
    return 0;
}

time_t time(time_t *tloc) {
    int64_t real, seconds, rest;
    if (read_real(CLOCK_REALTIME, &real) != 0)
        return (time_t)-1;
    split(virtual_ns(CLOCK_REALTIME, real), &seconds, &rest);
    if (tloc)
        *tloc = (time_t)seconds;
    return (time_t)seconds;
}
