// Command watch_and_call watches an ID token from tokenbroker and calls a
// URL with it.
//
// The current token arrives at once and every refreshed one after it; each
// is used for one call (a real program would keep the latest token for all
// its calls). If the broker restarts, the watch subscribes again after a
// jittered backoff and goes on. The token itself is never printed.
//
// The client code is generated from proto/ with protoc-gen-go and
// protoc-gen-go-grpc into the package imported as "tokenbroker/v1" by
// examples/go/build.sh, which builds it with Debian's Go toolchain and
// packages (GOPATH mode). tests/it/examples.rs builds and runs it.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math/rand"
	"net"
	"net/http"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "tokenbroker/v1"
)

const defaultSocket = "/run/tokenbroker/tokenbroker.sock"

func main() {
	audience := flag.String("audience", "", "the ID token's audience (required)")
	url := flag.String("url", "", "the URL to call (default: the audience)")
	calls := flag.Int("calls", 0, "stop after this many calls (0: never)")
	socket := flag.String("socket", socketPath(), "the broker's socket")
	flag.Parse()
	if *audience == "" {
		fmt.Fprintln(os.Stderr, "usage: watch_and_call --audience AUD [--url URL] [--calls N] [--socket PATH]")
		os.Exit(64)
	}
	if *url == "" {
		*url = *audience
	}

	// Dial the socket directly; the target "localhost" becomes the HTTP/2
	// authority, which is what the broker expects.
	conn, err := grpc.Dial("localhost",
		grpc.WithInsecure(),
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) {
			var dialer net.Dialer
			return dialer.DialContext(ctx, "unix", *socket)
		}))
	if err != nil {
		fmt.Fprintf(os.Stderr, "cannot connect to the broker at %s: %v\n", *socket, err)
		os.Exit(2)
	}
	defer conn.Close()
	broker := pb.NewTokenBrokerClient(conn)

	request := &pb.WatchTokenRequest{
		Request: &pb.WatchTokenRequest_IdToken{IdToken: &pb.GetIdTokenRequest{Audience: *audience}},
	}
	made := 0
	err = watch(context.Background(), broker, request, func(update *pb.Token) error {
		token := update.GetIdToken()
		code, err := call(*url, token.GetToken())
		if err != nil {
			fmt.Fprintf(os.Stderr, "calling %s: %v\n", *url, err)
			os.Exit(1)
		}
		expires := time.Unix(token.GetExpireTime().GetSeconds(), 0).UTC().Format(time.RFC3339)
		fmt.Printf("called %s: HTTP %d (token expires %s)\n", *url, code, expires)
		if code >= 400 {
			os.Exit(1)
		}
		if made++; made == *calls {
			return errDone
		}
		return nil
	})
	if err != nil && err != errDone {
		s := status.Convert(err)
		fmt.Fprintf(os.Stderr, "broker: %s: %s\n", s.Code(), s.Message())
		os.Exit(2)
	}
}

// errDone ends a watch from its callback.
var errDone = errors.New("done")

// watch calls each with every token of the watch, across broker restarts;
// never with an expired one. A stream that ends or breaks is opened again
// after a random wait of up to 50 ms, doubling to 5 s while the broker stays
// away. It returns each's error, or a refusal of the request itself
// (InvalidArgument, PermissionDenied, ...).
func watch(ctx context.Context, broker pb.TokenBrokerClient, request *pb.WatchTokenRequest, each func(*pb.Token) error) error {
	for failures := 0; ; {
		stream, err := broker.WatchToken(ctx, request, grpc.WaitForReady(true))
		for err == nil {
			var update *pb.Token
			if update, err = stream.Recv(); err == nil && unexpired(update) {
				failures = 0
				err = each(update)
			}
		}
		// io.EOF: the broker ended the stream; subscribe again.
		if s, isStatus := status.FromError(err); err != io.EOF && (!isStatus || !transient(s.Code())) {
			return err
		}
		failures++
		bound := 50 * time.Millisecond << uint(failures-1)
		if bound > 5*time.Second || bound <= 0 {
			bound = 5 * time.Second
		}
		time.Sleep(time.Duration(rand.Int63n(int64(bound))))
	}
}

// transient says whether a watch that failed with code is worth opening
// again: the broker was away or stopping, or the connection broke.
func transient(code codes.Code) bool {
	switch code {
	case codes.Unavailable, codes.Unknown, codes.Canceled, codes.Aborted, codes.DeadlineExceeded, codes.Internal:
		return true
	}
	return false
}

// unexpired says whether the token in update is still valid.
func unexpired(update *pb.Token) bool {
	var expiry int64
	if token := update.GetIdToken(); token != nil {
		expiry = token.GetExpireTime().GetSeconds()
	} else {
		expiry = update.GetAccessToken().GetExpireTime().GetSeconds()
	}
	return time.Unix(expiry, 0).After(time.Now())
}

// socketPath is $TOKENBROKER_SOCKET, else the broker's default.
func socketPath() string {
	if path := os.Getenv("TOKENBROKER_SOCKET"); path != "" {
		return path
	}
	return defaultSocket
}

// call GETs url with token as a bearer and returns the HTTP status.
func call(url, token string) (int, error) {
	request, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		return 0, err
	}
	request.Header.Set("Authorization", "Bearer "+token)
	client := http.Client{Timeout: 10 * time.Second}
	response, err := client.Do(request)
	if err != nil {
		return 0, err
	}
	response.Body.Close()
	return response.StatusCode, nil
}
