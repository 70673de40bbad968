// registrar-stub: a stand-in for kubelet plugin registration, used by tests/suites/80-pods.sh
// ONLY when stowage-node has no built-in registration (no --kubelet-root flag), so the pod
// scenarios can still run; the suite then reports the registration scenarios as failed.
// Serves pluginregistration v1 (GetInfo, NotifyRegistrationStatus) on -socket.
package main

import (
	"context"
	"flag"
	"log"
	"net"
	"os"
	"os/signal"
	"syscall"

	"google.golang.org/grpc"
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

func main() {
	sock := flag.String("socket", "", "registration socket (in <kubelet root>/plugins_registry/)")
	name := flag.String("driver", "", "CSI driver name")
	endpoint := flag.String("endpoint", "", "CSI socket path kubelet dials")
	flag.Parse()
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
