/*
 * Times keygate native's hooks for one allowed request with Envoy's
 * callbacks stubbed out (each a few instructions): what the module's own
 * code costs per request, without Envoy and without the noise of a shared
 * machine (thread CPU time, best of several runs). Also counts host calls
 * and heap allocations (the module's malloc calls) per request.
 *
 * The stubbed request is bench.py's X-API-Key row (GET /v1/items, key 1 of
 * 1k, 127.0.0.1, 7 request headers; 5 response headers); each iteration runs
 * filter_new, request_headers, response_headers, response_body,
 * stream_complete and destroy, as Envoy does for a direct response.
 *
 *   gcc -O2 -rdynamic -o /tmp/hookbench bench/native_hookbench.c -ldl
 *   .venv/bin/python -c "import json; from bench.bench import *; print(json.dumps({'routes': ROUTES, 'credentials': [record(0, secret_hash=sha(SECRET))] + [record(i) for i in range(1, 1000)], 'tokens': {'lifetime_secs': 86400}}))" > /tmp/plugin.json
 *   KEYGATE_TOKEN_KEYS=k1:$(printf 'a%.0s' $(seq 48)) taskset -c 1 /tmp/hookbench target/release/libkeygate_native.so /tmp/plugin.json 100000 5
 *
 * Compare two builds by alternating them several times (bench/RESULTS.md,
 * "p6-native"). Envoy's side of each call is not in these figures.
 */
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdint.h>
#include <stdbool.h>
#include <time.h>
typedef struct { const char *ptr; size_t len; } buf_t;
typedef struct { const char *k; size_t kl; const char *v; size_t vl; } hdr_t;
static hdr_t REQ[] = {
  {":authority",10,"127.0.0.1:10000",15},{":path",5,"/v1/items",9},{":method",7,"GET",3},{":scheme",7,"http",4},
  {"x-api-key",9,"bench-key-1",11},{"x-forwarded-proto",17,"http",4},{"x-request-id",12,"7f1c2d3e-4b5a-6978-8a9b-0c1d2e3f4a5b",36}};
static hdr_t RESP[] = {{":status",7,"200",3},{"content-length",14,"2",1},{"content-type",12,"text/plain",10},{"date",4,"Thu, 26 Nov 2026 07:00:00 GMT",29},{"server",6,"envoy",5}};
static long calls = 0;
void envoy_dynamic_module_callback_log(uint32_t l, buf_t m) { fprintf(stderr, "log: %.*s\n", (int)m.len, m.ptr); }
bool envoy_dynamic_module_callback_http_get_header(void *f, uint32_t t, buf_t k, buf_t *r, size_t i, size_t *n) { calls++; if (n) *n = 0; return false; }
size_t envoy_dynamic_module_callback_http_get_headers_size(void *f, uint32_t t) { calls++; return t == 0 ? 7 : 5; }
bool envoy_dynamic_module_callback_http_get_headers(void *f, uint32_t t, hdr_t *out) { calls++; memcpy(out, t == 0 ? REQ : RESP, (t == 0 ? 7 : 5) * sizeof(hdr_t)); return true; }
bool envoy_dynamic_module_callback_http_add_header(void *f, uint32_t t, buf_t k, buf_t v) { calls++; return v.len > 0; }
bool envoy_dynamic_module_callback_http_set_header(void *f, uint32_t t, buf_t k, buf_t v) { calls++; return true; }
void envoy_dynamic_module_callback_http_send_response(void *f, uint32_t s, void *h, size_t n, buf_t b, buf_t d) { calls++; fprintf(stderr, "local reply %u %.*s\n", s, (int)b.len, b.ptr); exit(1); }
size_t envoy_dynamic_module_callback_http_get_body_chunks_size(void *f, uint32_t t) { return 0; }
bool envoy_dynamic_module_callback_http_get_body_chunks(void *f, uint32_t t, buf_t *o) { return false; }
size_t envoy_dynamic_module_callback_http_get_body_size(void *f, uint32_t t) { return 0; }
static const char ADDR[] = "127.0.0.1:43210";
bool envoy_dynamic_module_callback_http_filter_get_attribute_string(void *f, uint32_t id, buf_t *r) { calls++; r->ptr = ADDR; r->len = sizeof(ADDR) - 1; return true; }
bool envoy_dynamic_module_callback_http_set_filter_state_bytes(void *f, buf_t k, buf_t v) { calls++; return true; }
static size_t next_counter = 0;
uint32_t envoy_dynamic_module_callback_http_filter_config_define_counter(void *c, buf_t n, buf_t *l, size_t ll, size_t *id) { *id = next_counter++; return 0; }
uint32_t envoy_dynamic_module_callback_http_filter_increment_counter(void *f, size_t id, buf_t *l, size_t ll, uint64_t v) { calls++; return 0; }
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
static long allocs = 0;
void *malloc(size_t n) { allocs++; return __libc_malloc(n); }
void *calloc(size_t a, size_t b) { allocs++; return __libc_calloc(a, b); }
void *realloc(void *p, size_t n) { if (!p) allocs++; return __libc_realloc(p, n); }
static double now(void) { struct timespec t; clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t); return t.tv_sec * 1e9 + t.tv_nsec; }
int main(int argc, char **argv) {
  void *h = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (!h) { fprintf(stderr, "%s\n", dlerror()); return 1; }
  FILE *fp = fopen(argv[2], "rb"); fseek(fp, 0, SEEK_END); long n = ftell(fp); rewind(fp);
  char *json = malloc(n); fread(json, 1, n, fp); fclose(fp);
  long iters = argc > 3 ? atol(argv[3]) : 200000; int reps = argc > 4 ? atoi(argv[4]) : 7;
  const char *(*init)(void) = dlsym(h, "envoy_dynamic_module_on_program_init");
  void *(*cfg_new)(void *, buf_t, buf_t) = dlsym(h, "envoy_dynamic_module_on_http_filter_config_new");
  void *(*fnew)(void *, void *) = dlsym(h, "envoy_dynamic_module_on_http_filter_new");
  uint32_t (*reqh)(void *, void *, bool) = dlsym(h, "envoy_dynamic_module_on_http_filter_request_headers");
  uint32_t (*resph)(void *, void *, bool) = dlsym(h, "envoy_dynamic_module_on_http_filter_response_headers");
  uint32_t (*respb)(void *, void *, bool) = dlsym(h, "envoy_dynamic_module_on_http_filter_response_body");
  void (*done)(void *) = dlsym(h, "envoy_dynamic_module_on_http_filter_stream_complete");
  void (*destroy)(void *) = dlsym(h, "envoy_dynamic_module_on_http_filter_destroy");
  init();
  buf_t name = {"keygate", 7}, cj = {json, (size_t)n};
  int stream_obj;
  void *cfg = cfg_new((void *)0x1, name, cj);
  if (!cfg) { fprintf(stderr, "config refused\n"); return 1; }
  double best = 1e18;
  for (int r = 0; r < reps; r++) {
    calls = 0; allocs = 0;
    double t0 = now();
    for (long i = 0; i < iters; i++) {
      void *f = fnew(cfg, &stream_obj);
      if (reqh(&stream_obj, f, true) != 0) { fprintf(stderr, "stopped\n"); return 1; }
      resph(&stream_obj, f, false);
      respb(&stream_obj, f, true);
      done(&stream_obj);
      destroy(f);
    }
    double ns = (now() - t0) / iters;
    if (ns < best) best = ns;
  }
  printf("%.1f ns/request (best of %d x %ld), %ld host calls/request, %.2f allocations/request\n", best, reps, iters, calls / iters, (double)allocs / iters);
  return 0;
}
