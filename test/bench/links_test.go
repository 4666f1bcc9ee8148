package main

import (
	"os"
	"strings"
	"testing"
)

func TestCPUSeconds(t *testing.T) {
	// Spend some CPU so that the reading is not 0.
	x := 0
	for i := range 50_000_000 {
		x += i % 7
	}
	_ = x
	s, err := cpuSeconds(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if s <= 0 {
		t.Fatalf("cpuSeconds = %v", s)
	}
}

func TestTLSCost(t *testing.T) {
	run := func(label string, f, cpu float64) Run {
		return Run{Label: label, FractionOfLimit: f, ServerCPUSecondsPerGiB: cpu, TLS: strings.HasSuffix(label, "-tls")}
	}
	s := Scenario{Name: "P1", Runs: []Run{run("stripe", 0.70, 1), run("claim-stripe", 0.92, 1.5), run("claim-stripe-tls", 0.90, 2),
		run("observer-stripe", 0.71, 1), run("observer-stripe-tls", 0.66, 2.5)}}
	got := tlsCost(s)
	for _, want := range []string{"claim 0.92 -> 0.90 (delta -0.02, met), CPU 1.50 -> 2.00 s/GiB", "observer 0.71 -> 0.66 (delta -0.05, missed)"} {
		if !strings.Contains(got, want) {
			t.Errorf("tlsCost = %q, want %q in it", got, want)
		}
	}
	if strings.Contains(got, "stripe 0.70") {
		t.Errorf("tlsCost = %q: stripe has no twin", got)
	}
	if got := tlsCost(Scenario{Runs: []Run{run("stripe", 0.7, 1)}}); got != "" {
		t.Errorf("no twins: %q", got)
	}
}
