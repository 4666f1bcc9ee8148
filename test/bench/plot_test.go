package main

import (
	"bytes"
	"fmt"
	"image/png"
	"os"
	"path/filepath"
	"slices"
	"testing"
)

func TestRunLabels(t *testing.T) {
	for _, tc := range []struct {
		name string
		runs [][]string // per scenario
		want []string
	}{
		{name: "fixed order whatever the runs' order",
			runs: [][]string{{"observer-stripe", "stripe", "traditional"}, {"claim-stripe", "first"}},
			want: []string{"traditional", "first", "stripe", "claim-stripe", "observer-stripe"}},
		{name: "others follow in order of appearance",
			runs: [][]string{{"zeta", "stripe"}, {"alpha", "zeta", "traditional"}},
			want: []string{"traditional", "stripe", "zeta", "alpha"}},
		{name: "none", runs: [][]string{{}}, want: nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var ss []Scenario
			for _, labels := range tc.runs {
				var s Scenario
				for _, l := range labels {
					s.Runs = append(s.Runs, Run{Label: l})
				}
				ss = append(ss, s)
			}
			if got := runLabels(ss); !slices.Equal(got, tc.want) {
				t.Fatalf("runLabels = %q, want %q", got, tc.want)
			}
		})
	}
}

// TestPlotShaped renders P1 and P2 with every run (P2 missing one) and
// checks that a PNG comes out. COOP_BENCH_PLOT_OUT=path keeps a copy to
// look at.
func TestPlotShaped(t *testing.T) {
	run := func(label string, f float64) Run { return Run{Label: label, FractionOfLimit: f} }
	ss := []Scenario{
		{Name: "P1", LimitSeconds: 10.74, Target: 0.90, Runs: []Run{
			run("traditional", 0.23), run("first", 0.22), run("stripe", 0.69), run("claim-stripe", 0.92), run("observer-stripe", 0.71)}},
		{Name: "P2", LimitSeconds: 11.45, Target: 0.85, Runs: []Run{
			run("traditional", 0.25), run("stripe", 0.85), run("claim-stripe", 0.88), run("observer-stripe", 0.82), run("first", 0.25)}},
	}
	path := filepath.Join(t.TempDir(), "shaped.png")
	if err := plotShaped(path, ss); err != nil {
		t.Fatal(err)
	}
	checkPNG(t, path, 500, "COOP_BENCH_PLOT_OUT")
}

// TestPlotBurst renders a P5 scenario with a killed and a failed
// destination and a corrupt holder, and checks that a PNG comes out.
// COOP_BENCH_PLOT_BURST_OUT=path keeps a copy to look at.
func TestPlotBurst(t *testing.T) {
	run := func(label string, secs float64, source int64) Run {
		r := Run{Label: label, SourceBytes: source * mib, ImageBytes: 128 * mib}
		for i := range burstDests {
			r.Destinations = append(r.Destinations, BurstDest{Name: fmt.Sprintf("d%d", i+1), Seconds: secs * (1 - float64(i)/20), Uploaded: int64(i) * 10 * mib})
		}
		return r
	}
	killed := run("swarm-2killed", 14, 150)
	killed.Destinations[6].Killed, killed.Destinations[6].Seconds = true, 0
	killed.Destinations[7].Seconds = 0
	corrupt := run("swarm-corrupt", 30, 300)
	corrupt.CorruptHolderServed = 40 * mib
	s := Scenario{Name: "P5", Bytes: 128 * mib, LimitSeconds: 10.74, Runs: []Run{
		run("traditional", 90, 1024), run("stripe", 88, 1024), run("swarm", 13, 140), killed, corrupt}}
	path := filepath.Join(t.TempDir(), "burst.png")
	if err := plotBurst(path, s); err != nil {
		t.Fatal(err)
	}
	checkPNG(t, path, 600, "COOP_BENCH_PLOT_BURST_OUT")
}

// checkPNG fails unless path is a PNG at least minWidth pixels wide; with
// the environment variable outEnv set, it keeps a copy there to look at.
func checkPNG(t *testing.T, path string, minWidth int, outEnv string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	img, err := png.Decode(bytes.NewReader(b))
	if err != nil {
		t.Fatalf("not a PNG: %v", err)
	}
	if w := img.Bounds().Dx(); w < minWidth {
		t.Fatalf("width %d px", w)
	}
	if out := os.Getenv(outEnv); out != "" {
		if err := os.WriteFile(out, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
