/*
 * ferry-guest: the workload of ferry's tiny test guest. Started by /init, configured from the
 * kernel command line, it proves from inside the guest what a migration did:
 *
 *   ferry.write=<writes/s per disk, 0 = flat out>  sequence-numbered self-checking records on
 *                                                  every virtio disk, O_DIRECT, then fdatasync
 *   ferry.ack=<n>                                  ack at least every n writes (and every 200 ms)
 *   ferry.tick=<ms>                                `tick <n>` at that interval
 *   ferry.dirty=<MiB>:<MiB/s, 0 = flat out>        keep rewriting that much RAM
 *   ferry.disks=<n>                                wait until n virtio disks are present
 *   ferry.probe=<ms>                               every <ms>, time a 4 KiB O_DIRECT read at a
 *                                                  random offset of each disk (`lat r`), and the
 *                                                  writer times its acked write+fdatasync (`lat w`)
 *
 * Serial protocol, one line per write(2) so workloads never interleave inside a line:
 *   ferry-ready | ack <disk> <seq> | tick <n> | full <disk> | ferry-error <text>
 *   lat r <disk> <microseconds> | lat w <disk> <microseconds>
 *
 * `ack d 41` means records 0..41 of disk d were written and an fdatasync returned after them.
 *
 * Record (4096 bytes, little-endian), at byte offset slot(seq) * 4096:
 *   0 magic "FERRYREC" | 8 seq u64 | 16 offset u64 | 24 disk id, 16 bytes NUL padded |
 *   40..4092 payload from xorshift64(seq ^ PAYLOAD_SEED) | 4092 CRC-32 (zlib) of bytes 0..4092
 * slot(seq) = (seq * 1000003) mod nslots, or seq when gcd(1000003, nslots) != 1; nslots = size/4096.
 * src/guest/record.ts is the same definition in TypeScript.
 *
 * `ferry-guest --record <seq> <offset> <disk>` writes one record to stdout (for the TS tests).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define RECORD 4096
#define STRIDE 1000003ULL
#define PAYLOAD_SEED 0x9E3779B97F4A7C15ULL
#define MAX_DISKS 16

static int console = 1;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
  char line[256];
  va_list ap;
  va_start(ap, fmt);
  int n = vsnprintf(line, sizeof line - 1, fmt, ap);
  va_end(ap);
  if (n < 0) return;
  if (n > (int)sizeof line - 2) n = sizeof line - 2;
  line[n++] = '\n';
  ssize_t w = write(console, line, (size_t)n);
  (void)w;
}

static uint32_t crc_table[256];
static void crc_init(void) {
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320U ^ (c >> 1) : c >> 1;
    crc_table[i] = c;
  }
}
static uint32_t crc32(const uint8_t *p, size_t n) {
  uint32_t c = 0xFFFFFFFFU;
  while (n--) c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFU;
}

static void put64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static void encode(uint8_t *buf, uint64_t seq, uint64_t offset, const char *disk) {
  memcpy(buf, "FERRYREC", 8);
  put64(buf + 8, seq);
  put64(buf + 16, offset);
  memset(buf + 24, 0, 16);
  strncpy((char *)buf + 24, disk, 16);
  uint64_t x = seq ^ PAYLOAD_SEED;
  if (x == 0) x = 1;
  for (size_t i = 40; i < 4092; i += 8) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    uint8_t w[8];
    put64(w, x);
    size_t n = 4092 - i < 8 ? 4092 - i : 8;
    memcpy(buf + i, w, n);
  }
  uint32_t c = crc32(buf, 4092);
  buf[4092] = (uint8_t)c;
  buf[4093] = (uint8_t)(c >> 8);
  buf[4094] = (uint8_t)(c >> 16);
  buf[4095] = (uint8_t)(c >> 24);
}

static uint64_t gcd(uint64_t a, uint64_t b) {
  while (b) {
    uint64_t t = a % b;
    a = b;
    b = t;
  }
  return a;
}

static uint64_t slot_of(uint64_t seq, uint64_t nslots) {
  uint64_t stride = gcd(STRIDE, nslots) == 1 ? STRIDE : 1;
  return (seq % nslots) * stride % nslots;
}

static double now_s(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void sleep_s(double s) {
  if (s <= 0) return;
  struct timespec t = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
  while (nanosleep(&t, &t) < 0 && errno == EINTR) {
  }
}

/* ---- kernel command line ---- */
static char cmdline[4096];
static const char *arg(const char *key) {
  size_t k = strlen(key);
  for (char *p = cmdline; (p = strstr(p, key)) != NULL; p += k) {
    if ((p == cmdline || p[-1] == ' ') && p[k] == '=') return p + k + 1;
  }
  return NULL;
}

/* ---- workloads ---- */
static int probe_ms = 0;

static void writer(const char *dev, const char *disk, uint64_t size, double rate, long ack_every) {
  int fd = open(dev, O_RDWR | O_DIRECT);
  if (fd < 0) {
    say("ferry-error open %s: %s", dev, strerror(errno));
    _exit(1);
  }
  uint8_t *buf;
  if (posix_memalign((void **)&buf, RECORD, RECORD) != 0) _exit(1);
  uint64_t nslots = size / RECORD;
  double start = now_s(), last_ack = start;
  long unacked = 0;
  for (uint64_t seq = 0; seq < nslots; seq++) {
    uint64_t off = slot_of(seq, nslots) * RECORD;
    encode(buf, seq, off, disk);
    double wrote_at = now_s();
    if (pwrite(fd, buf, RECORD, (off_t)off) != RECORD) {
      say("ferry-error write %s seq %llu: %s", disk, (unsigned long long)seq, strerror(errno));
      _exit(1);
    }
    unacked++;
    double t = now_s();
    if (unacked >= ack_every || t - last_ack >= 0.2) {
      if (fdatasync(fd) != 0) {
        say("ferry-error fdatasync %s: %s", disk, strerror(errno));
        _exit(1);
      }
      say("ack %s %llu", disk, (unsigned long long)seq);
      if (probe_ms > 0) say("lat w %s %ld", disk, (long)((now_s() - wrote_at) * 1e6));
      unacked = 0;
      last_ack = t;
    }
    if (rate > 0) sleep_s(start + (double)(seq + 1) / rate - now_s());
  }
  fdatasync(fd);
  say("ack %s %llu", disk, (unsigned long long)(nslots - 1));
  say("full %s", disk);
  _exit(0);
}

static void prober(const char *dev, const char *disk, uint64_t size, long ms) {
  int fd = open(dev, O_RDONLY | O_DIRECT);
  if (fd < 0) _exit(1);
  uint8_t *buf;
  if (posix_memalign((void **)&buf, RECORD, RECORD) != 0) _exit(1);
  uint64_t x = 0x9e3779b97f4a7c15ull ^ (uint64_t)getpid();
  uint64_t nblocks = size / RECORD;
  for (;;) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    double t = now_s();
    ssize_t r = pread(fd, buf, RECORD, (off_t)((x % nblocks) * RECORD));
    if (r != RECORD) say("ferry-error probe read %s: %s", disk, strerror(errno));
    else say("lat r %s %ld", disk, (long)((now_s() - t) * 1e6));
    sleep_s((double)ms / 1000.0);
  }
}

static void ticker(long ms) {
  for (unsigned long n = 1;; n++) {
    say("tick %lu", n);
    /* Relative sleeps: after a pause the ticker goes on, it does not print a burst to catch up. */
    sleep_s((double)ms / 1000.0);
  }
}

static void dirtier(long mib, double rate) {
  size_t bytes = (size_t)mib << 20;
  volatile uint8_t *mem = malloc(bytes);
  if (!mem) {
    say("ferry-error dirty: cannot allocate %ld MiB", mib);
    _exit(1);
  }
  for (uint8_t round = 1;; round++) {
    double start = now_s();
    for (size_t m = 0; m < (size_t)mib; m++) {
      for (size_t p = 0; p < (1u << 20); p += 4096) mem[(m << 20) + p] = round;
      if (rate > 0) sleep_s(start + (double)(m + 1) / rate - now_s());
    }
  }
}

struct disk {
  char dev[300];
  char id[17];
  uint64_t size;
};

static int find_disks(struct disk *d) {
  int n = 0;
  DIR *dir = opendir("/sys/block");
  if (!dir) return 0;
  struct dirent *e;
  while ((e = readdir(dir)) != NULL && n < MAX_DISKS) {
    if (strncmp(e->d_name, "vd", 2) != 0) continue;
    char path[300], line[64] = {0};
    snprintf(d[n].dev, sizeof d[n].dev, "/dev/%s", e->d_name);
    snprintf(path, sizeof path, "/sys/block/%s/serial", e->d_name);
    FILE *f = fopen(path, "r");
    if (f && fgets(line, sizeof line, f)) line[strcspn(line, "\n ")] = 0;
    if (f) fclose(f);
    snprintf(d[n].id, sizeof d[n].id, "%s", line[0] ? line : e->d_name);
    snprintf(path, sizeof path, "/sys/block/%s/size", e->d_name);
    f = fopen(path, "r");
    unsigned long long sectors = 0;
    if (f && fscanf(f, "%llu", &sectors) != 1) sectors = 0;
    if (f) fclose(f);
    d[n].size = sectors * 512;
    n++;
  }
  closedir(dir);
  return n;
}

int main(int argc, char **argv) {
  crc_init();
  if (argc == 5 && strcmp(argv[1], "--record") == 0) {
    static uint8_t buf[RECORD];
    encode(buf, strtoull(argv[2], NULL, 10), strtoull(argv[3], NULL, 10), argv[4]);
    return fwrite(buf, 1, RECORD, stdout) == RECORD ? 0 : 1;
  }
  int fd = open("/dev/console", O_WRONLY | O_NOCTTY);
  if (fd >= 0) console = fd;
  int c = open("/proc/cmdline", O_RDONLY);
  if (c >= 0) {
    ssize_t r = read(c, cmdline, sizeof cmdline - 1);
    if (r > 0) cmdline[r] = 0;
    close(c);
  }
  const char *w = arg("ferry.write"), *a = arg("ferry.ack"), *t = arg("ferry.tick"), *dm = arg("ferry.dirty"),
             *nd = arg("ferry.disks"), *pr = arg("ferry.probe");
  probe_ms = pr ? atoi(pr) : 0;

  struct disk disks[MAX_DISKS];
  int want = nd ? atoi(nd) : 0, n = 0;
  for (int i = 0; i < 100; i++) {
    n = find_disks(disks);
    if (n >= want) break;
    sleep_s(0.05);
  }
  if (n < want) say("ferry-error expected %d disks, found %d", want, n);

  if (w) {
    double rate = atof(w);
    long ack_every = a ? atol(a) : 8;
    if (ack_every < 1) ack_every = 1;
    for (int i = 0; i < n; i++) {
      if (disks[i].size < RECORD) continue;
      if (fork() == 0) writer(disks[i].dev, disks[i].id, disks[i].size, rate, ack_every);
    }
  }
  if (probe_ms > 0) {
    for (int i = 0; i < n; i++) {
      if (disks[i].size >= RECORD && fork() == 0) prober(disks[i].dev, disks[i].id, disks[i].size, probe_ms);
    }
  }
  if (t && atol(t) > 0 && fork() == 0) ticker(atol(t));
  if (dm) {
    long mib = atol(dm);
    const char *colon = strchr(dm, ':');
    double rate = colon ? atof(colon + 1) : 0;
    if (mib > 0 && fork() == 0) dirtier(mib, rate);
  }
  say("ferry-ready");
  /* PID 1 must never exit; reap whatever ends. */
  for (;;) {
    if (wait(NULL) < 0) pause();
  }
}
