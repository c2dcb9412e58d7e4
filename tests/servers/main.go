// The Go net/http server in tests/servers.rs: serves the inherited socket (fd 3), sends
// READY=1 to $NOTIFY_SOCKET once it serves (what go-systemd's daemon.SdNotify does), and
// on SIGTERM shuts down gracefully (http.Server.Shutdown: stop accepting, finish in-flight
// requests, close idle keep-alive connections).
// Built by the test with CGO_ENABLED=0 (a static binary that runs in any rootfs).
package main

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	f := os.NewFile(3, "listen0")
	ln, err := net.FileListener(f)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fd 3 is not a listening socket:", err)
		os.Exit(1)
	}
	f.Close()
	generation, worker := os.Getenv("CLUSTER_GENERATION"), os.Getenv("WORKER_ID")
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain")
		fmt.Fprintf(w, "pid=%d generation=%s worker=%s server=go\n", os.Getpid(), generation, worker)
	})}
	stop, cancel := signal.NotifyContext(context.Background(), syscall.SIGTERM)
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	if addr := os.Getenv("NOTIFY_SOCKET"); addr != "" {
		if conn, err := net.Dial("unixgram", addr); err == nil {
			conn.Write([]byte("READY=1"))
			conn.Close()
		}
	}
	select {
	case err := <-done:
		fmt.Fprintln(os.Stderr, "serve:", err)
		os.Exit(1)
	case <-stop.Done():
	}
	ctx, cancelShutdown := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancelShutdown()
	if err := srv.Shutdown(ctx); err != nil {
		fmt.Fprintln(os.Stderr, "shutdown:", err)
		os.Exit(1)
	}
}
