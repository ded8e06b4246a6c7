// Command watch_and_call watches an ID token from tokenbroker and calls a
// URL with it.
//
// The current token arrives at once and every refreshed one after it; each
// is used for one call (a real program would keep the latest token for all
// its calls). The token itself is never printed.
//
// The client code is generated from proto/ with protoc-gen-go and
// protoc-gen-go-grpc into the package imported as "tokenbroker/v1" by
// examples/go/build.sh, which builds it with Debian's Go toolchain and
// packages (GOPATH mode). tests/it/examples.rs builds and runs it.
package main

import (
	"context"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"time"

	"google.golang.org/grpc"
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

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stream, err := broker.WatchToken(ctx, &pb.WatchTokenRequest{
		Request: &pb.WatchTokenRequest_IdToken{IdToken: &pb.GetIdTokenRequest{Audience: *audience}},
	})
	for n := 0; err == nil && (*calls == 0 || n < *calls); n++ {
		var update *pb.Token
		if update, err = stream.Recv(); err != nil {
			break
		}
		token := update.GetIdToken()
		code, callErr := call(*url, token.GetToken())
		if callErr != nil {
			fmt.Fprintf(os.Stderr, "calling %s: %v\n", *url, callErr)
			os.Exit(1)
		}
		expires := time.Unix(token.GetExpireTime().GetSeconds(), 0).UTC().Format(time.RFC3339)
		fmt.Printf("called %s: HTTP %d (token expires %s)\n", *url, code, expires)
		if code >= 400 {
			os.Exit(1)
		}
	}
	if err != nil {
		s := status.Convert(err)
		fmt.Fprintf(os.Stderr, "broker: %s: %s\n", s.Code(), s.Message())
		os.Exit(2)
	}
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
