// registrar-stub: a stand-in for kubelet plugin registration, used by tests/suites/80-pods.sh
// ONLY when stowage-node has no built-in registration (no --kubelet-root flag), so the pod
// scenarios can still run; the suite then reports the registration scenarios as failed.
// Serves pluginregistration v1 (GetInfo, NotifyRegistrationStatus) on -socket.
//
// With -probe SOCKET it is a client instead: it calls GetInfo on SOCKET dialled exactly the way
// kubelet's plugin watcher dials (pkg/kubelet/pluginmanager/operationexecutor: the socket path
// as the gRPC target, so the HTTP/2 :authority is that path), then once more with
// :authority "localhost" (the way kubelet's CSI client dials), and prints both results.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

type server struct {
	registerapi.UnimplementedRegistrationServer
	name, endpoint string
}

func (s *server) GetInfo(ctx context.Context, _ *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	log.Printf("GetInfo: %s at %s", s.name, s.endpoint)
	return &registerapi.PluginInfo{Type: registerapi.CSIPlugin, Name: s.name, Endpoint: s.endpoint, SupportedVersions: []string{"1.0.0"}}, nil
}

func (s *server) NotifyRegistrationStatus(ctx context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	log.Printf("NotifyRegistrationStatus: registered=%v error=%q", st.PluginRegistered, st.Error)
	return &registerapi.RegistrationStatusResponse{}, nil
}

func probe(sock string, opts ...grpc.DialOption) string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	opts = append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithBlock(),
		grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return (&net.Dialer{}).DialContext(ctx, "unix", addr)
		}))
	c, err := grpc.DialContext(ctx, sock, opts...)
	if err != nil {
		return "dial: " + err.Error()
	}
	defer c.Close()
	info, err := registerapi.NewRegistrationClient(c).GetInfo(ctx, &registerapi.InfoRequest{})
	if err != nil {
		return "GetInfo: " + err.Error()
	}
	return "GetInfo OK: " + info.String()
}

func main() {
	probeSock := flag.String("probe", "", "call GetInfo on this socket as kubelet does, print the result, exit")
	sock := flag.String("socket", "", "registration socket (in <kubelet root>/plugins_registry/)")
	name := flag.String("driver", "", "CSI driver name")
	endpoint := flag.String("endpoint", "", "CSI socket path kubelet dials")
	flag.Parse()
	if *probeSock != "" {
		fmt.Printf("as kubelet's plugin watcher dials (:authority = socket path): %s\n", probe(*probeSock))
		fmt.Printf("with :authority localhost (as kubelet's CSI client dials): %s\n", probe(*probeSock, grpc.WithAuthority("localhost")))
		return
	}
	_ = os.Remove(*sock)
	l, err := net.Listen("unix", *sock)
	if err != nil {
		log.Fatal(err)
	}
	g := grpc.NewServer()
	registerapi.RegisterRegistrationServer(g, &server{name: *name, endpoint: *endpoint})
	c := make(chan os.Signal, 1)
	signal.Notify(c, syscall.SIGTERM, syscall.SIGINT)
	go func() { <-c; g.Stop(); _ = os.Remove(*sock); os.Exit(0) }()
	log.Printf("serving registration for %s on %s", *name, *sock)
	log.Fatal(g.Serve(l))
}
