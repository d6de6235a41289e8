/* LD_PRELOAD shim: force numeric getnameinfo() (no reverse DNS).
 *
 * torch's socket code calls getnameinfo() without NI_NUMERICHOST for every
 * connected or accepted socket, only to build log strings. On a machine whose
 * resolver times out on bursts of PTR queries, a connection storm then
 * measures the resolver (5 s per lookup), not the store. This shim finds
 * libc's real getnameinfo with dlsym(RTLD_NEXT, ...) and calls it with the
 * caller's arguments plus NI_NUMERICHOST, so every address is formatted as a
 * numeric IP and no DNS query is sent. The benchmark preloads it into its own
 * process; every server and worker process inherits it, ours and torch's
 * alike (ours never calls getnameinfo on the connection path anyway).
 *
 * Built at benchmark time: gcc -shared -fPIC -O2 -o shim.so getnameinfo_shim.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netdb.h>
#include <sys/socket.h>

typedef int (*getnameinfo_fn)(const struct sockaddr *, socklen_t, char *, socklen_t,
                              char *, socklen_t, int);

int getnameinfo(const struct sockaddr *addr, socklen_t addrlen, char *host, socklen_t hostlen,
                char *serv, socklen_t servlen, int flags) {
    static getnameinfo_fn real = 0;
    if (!real) {
        real = (getnameinfo_fn)dlsym(RTLD_NEXT, "getnameinfo");
        if (!real) return EAI_FAIL;
    }
    return real(addr, addrlen, host, hostlen, serv, servlen, flags | NI_NUMERICHOST);
}
