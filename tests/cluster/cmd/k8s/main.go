// Command k8s is one multi-call binary for the test control plane: its first argument
// picks the component, and each component runs as its own process. One binary keeps the
// cold build to one link of the shared Kubernetes packages.
//
//	k8s etcd ...                     etcd 3.6 (go.etcd.io/etcd/server/v3/etcdmain)
//	k8s kube-apiserver ...           k8s.io/kubernetes/cmd/kube-apiserver
//	k8s kube-controller-manager ...  k8s.io/kubernetes/cmd/kube-controller-manager
//	k8s kube-scheduler ...           k8s.io/kubernetes/cmd/kube-scheduler
package main

import (
	"fmt"
	"os"

	_ "time/tzdata" // CronJob time zones, as kube-controller-manager's main has it

	"github.com/spf13/cobra"
	"go.etcd.io/etcd/server/v3/etcdmain"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // JSON log format, as each component's main registers it
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // client-go metrics
	_ "k8s.io/component-base/metrics/prometheus/version"  // version metric
	apiserver "k8s.io/kubernetes/cmd/kube-apiserver/app"
	controllermanager "k8s.io/kubernetes/cmd/kube-controller-manager/app"
	scheduler "k8s.io/kubernetes/cmd/kube-scheduler/app"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: k8s etcd|kube-apiserver|kube-controller-manager|kube-scheduler [flags]")
		os.Exit(2)
	}
	component, args := os.Args[1], os.Args[2:]
	switch component {
	case "etcd":
		// etcdmain reads os.Args itself: make it look like the etcd binary was called.
		etcdmain.Main(append([]string{"etcd"}, args...))
	case "kube-apiserver":
		run(apiserver.NewAPIServerCommand(), args)
	case "kube-controller-manager":
		run(controllermanager.NewControllerManagerCommand(), args)
	case "kube-scheduler":
		run(scheduler.NewSchedulerCommand(), args)
	default:
		fmt.Fprintf(os.Stderr, "k8s: unknown component %q\n", component)
		os.Exit(2)
	}
}

// run hands the remaining arguments to a component's cobra command, as its own main does.
func run(cmd *cobra.Command, args []string) {
	cmd.SetArgs(args)
	os.Exit(cli.Run(cmd))
}
