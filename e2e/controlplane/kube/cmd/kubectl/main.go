// Command kubectl is the upstream kubectl of the same release, so `cargo dev up` users and the
// tests (kubectl get, kubectl explain, kubectl wait) need nothing installed by hand.
package main

import (
	"k8s.io/component-base/cli"
	"k8s.io/kubectl/pkg/cmd"
	"k8s.io/kubectl/pkg/cmd/util"
)

func main() {
	command := cmd.NewDefaultKubectlCommand()
	if err := cli.RunNoErrOutput(command); err != nil {
		util.CheckErr(err)
	}
}
