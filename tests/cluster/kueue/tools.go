//go:build tools

// Package tools pins Kueue's manager for `go build sigs.k8s.io/kueue/cmd/kueue`.
package tools

import _ "sigs.k8s.io/kueue/cmd/kueue"
