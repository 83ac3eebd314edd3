/* A cache of large host memory blocks, preloaded into jaxscale processes (docs/throughput.md).

   XLA:CPU allocates each execution's temporaries (hundreds of MiB for a training step) with
   posix_memalign, and its Eigen matmuls their packing buffers with malloc, and frees them when
   they end. glibc maps every block over 32 MiB afresh and unmaps it on free, so every step
   faults in fresh pages and the kernel zeroes them: 9% of the CPU time of a one-device step,
   19% with 8 emulated devices. This library keeps freed blocks mapped, those of posix_memalign
   from 16 MiB and of malloc from 32 MiB, and hands them out again for requests of about their
   size; everything else goes to glibc (its __libc_* entry points). Its blocks, and only they,
   start on a 2 MiB boundary (the huge-page size), which keeps free() of other pointers to one
   test of the address. Idle blocks are kept up to an eighth of the physical memory (at least
   1 GiB), or JAXSCALE_BLOCK_CACHE_MB; beyond it they go back to the system, largest first. */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define ALIGN ((size_t)2 << 20)
#define MIN_ALIGNED ((size_t)16 << 20) /* XLA's buffers */
#define MIN_MALLOC ((size_t)32 << 20)  /* glibc maps every block above it afresh */
#define SLOTS 256

static struct { char *p; size_t size; int used; } blocks[SLOTS];
static size_t idle_bytes, idle_cap;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t once = PTHREAD_ONCE_INIT;
extern void *__libc_malloc(size_t);
extern void *__libc_memalign(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void __libc_free(void *);

static void hold(void) { pthread_mutex_lock(&lock); }
static void release(void) { pthread_mutex_unlock(&lock); }

static void init(void) {
  const char *mb = getenv("JAXSCALE_BLOCK_CACHE_MB");
  long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  size_t eighth = pages > 0 && page > 0 ? (size_t)pages * (size_t)page / 8 : 0;
  idle_cap = mb ? (size_t)strtoull(mb, NULL, 10) << 20
                : (eighth > ((size_t)1 << 30) ? eighth : (size_t)1 << 30);
  pthread_atfork(hold, release, release);
}

__attribute__((constructor)) static void setup(void) { pthread_once(&once, init); }

/* The slot holding `p`, or -1. Called with the lock held. */
static int find(const void *p) {
  for (int i = 0; i < SLOTS; i++)
    if (blocks[i].p == p) return i;
  return -1;
}

/* The largest idle block's slot, or -1. Called with the lock held. */
static int largest_idle(void) {
  int worst = -1;
  for (int i = 0; i < SLOTS; i++)
    if (blocks[i].p && !blocks[i].used && (worst < 0 || blocks[i].size > blocks[worst].size))
      worst = i;
  return worst;
}

/* Gives the idle block in slot `i` back to the system. Called with the lock held. */
static void unmap_idle(int i) {
  munmap(blocks[i].p, blocks[i].size);
  idle_bytes -= blocks[i].size;
  blocks[i].p = NULL;
}

/* Unmaps idle blocks, largest first, until they fit the cap. Called with the lock held. */
static void trim(void) {
  for (int i; idle_bytes > idle_cap && (i = largest_idle()) >= 0;) unmap_idle(i);
}

static char *map_aligned(size_t size) {
  char *raw = mmap(NULL, size + ALIGN, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return NULL;
  char *p = (char *)(((uintptr_t)raw + ALIGN - 1) & ~(uintptr_t)(ALIGN - 1));
  if (p > raw) munmap(raw, (size_t)(p - raw));
  munmap(p + size, (size_t)(raw + ALIGN - p));
  madvise(p, size, MADV_HUGEPAGE);
  return p;
}

/* A cached or new block of `size` bytes, or NULL where none can be had (the C library's turn). */
static void *take(size_t size) {
  if (size > ((size_t)1 << 46)) return NULL;
  size_t need = (size + ALIGN - 1) & ~(ALIGN - 1);
  int best = -1, empty = -1;
  pthread_once(&once, init);
  hold();
  for (int i = 0; i < SLOTS; i++) {
    if (!blocks[i].p) {
      if (empty < 0) empty = i;
    } else if (!blocks[i].used && blocks[i].size >= need && blocks[i].size <= need + need / 4
               && (best < 0 || blocks[i].size < blocks[best].size)) {
      best = i;
    }
  }
  if (best < 0 && empty < 0 && (empty = largest_idle()) >= 0)  /* all slots taken: make room */
    unmap_idle(empty);
  char *p = NULL;
  if (best >= 0) {
    blocks[best].used = 1;
    idle_bytes -= blocks[best].size;
    p = blocks[best].p;
  } else if (empty >= 0 && (p = map_aligned(need)) != NULL) {
    blocks[empty].p = p;
    blocks[empty].size = need;
    blocks[empty].used = 1;
  }
  release();
  return p;
}

int posix_memalign(void **out, size_t alignment, size_t size) {
  if (alignment == 0 || (alignment & (alignment - 1)) || alignment % sizeof(void *)) return EINVAL;
  void *p = size >= MIN_ALIGNED && alignment <= ALIGN ? take(size) : NULL;
  if (!p && !(p = __libc_memalign(alignment, size))) return ENOMEM;
  *out = p;
  return 0;
}

void *malloc(size_t size) {
  void *p = size >= MIN_MALLOC ? take(size) : NULL;
  return p ? p : __libc_malloc(size);
}

/* Takes back `p` if it is one of the cache's blocks; 0 if it is not. */
static int give_back(void *p) {
  if (!p || ((uintptr_t)p & (ALIGN - 1)) != 0) return 0;
  hold();
  int i = find(p);
  if (i >= 0) {
    blocks[i].used = 0;
    idle_bytes += blocks[i].size;
    trim();
  }
  release();
  return i >= 0;
}

void free(void *p) {
  if (!give_back(p)) __libc_free(p);
}

void *realloc(void *p, size_t size) {
  size_t old = 0;
  if (p && ((uintptr_t)p & (ALIGN - 1)) == 0) {
    hold();
    int i = find(p);
    old = i >= 0 ? blocks[i].size : 0;
    release();
  }
  if (!old) return __libc_realloc(p, size);
  void *q = malloc(size);
  if (q) {
    memcpy(q, p, old < size ? old : size);
    give_back(p);
  }
  return q;
}
