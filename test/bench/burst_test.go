package main

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strings"
	"testing"

	"github.com/coopnet/coop/test/harness"
)

func TestSummarizeBurst(t *testing.T) {
	run := Run{Label: "swarm-2killed", RegistryBytes: 10, SourceServedBytes: 190, Destinations: []BurstDest{
		{Name: "d1", Seconds: 12, Attempts: 1, BlobsChecked: 6},
		{Name: "d2", Seconds: 10, Attempts: 2, BlobsChecked: 6, Corrupt: 1},
		{Name: "d3", Seconds: 20, Attempts: 1, BlobsChecked: 6},
		{Name: "d4", Killed: true, Attempts: 1},
		{Name: "d5", Attempts: 3, Error: "failed"},
	}}
	summarizeBurst(&run, 5, 100)
	if run.Seconds != 20 || run.P50Seconds != 12 || run.Completed != 3 {
		t.Fatalf("seconds %v p50 %v completed %d", run.Seconds, run.P50Seconds, run.Completed)
	}
	if math.Abs(run.FractionOfLimit-0.25) > 1e-9 || math.Abs(run.LimitMultiple-4) > 1e-9 {
		t.Fatalf("fraction %v multiple %v", run.FractionOfLimit, run.LimitMultiple)
	}
	if run.SourceBytes != 200 || run.SourceCopies != 2 || run.ImageBytes != 100 {
		t.Fatalf("source %d (%v images of %d)", run.SourceBytes, run.SourceCopies, run.ImageBytes)
	}
	// The killed destination's attempt is not counted; the failed one's are.
	if run.Attempts != 7 || run.BlobsChecked != 18 || run.Corrupt == nil || *run.Corrupt != 1 {
		t.Fatalf("attempts %d checked %d corrupt %v", run.Attempts, run.BlobsChecked, run.Corrupt)
	}
	if !slices.Equal(run.Samples, []float64{20}) {
		t.Fatalf("samples %v", run.Samples)
	}
	empty := Run{Destinations: []BurstDest{{Name: "d1", Attempts: 3}}}
	summarizeBurst(&empty, 5, 100)
	if empty.Seconds != 0 || empty.FractionOfLimit != 0 || empty.Completed != 0 {
		t.Fatalf("nothing completed: %+v", empty)
	}
	if got := burstVerdict(empty); got != "—" {
		t.Fatalf("verdict of an unlabelled run %q", got)
	}
	empty.Label = "swarm"
	if got := burstVerdict(empty); !strings.Contains(got, "limit (missed)") {
		t.Fatalf("verdict %q", got)
	}
}

func TestParseIfaceStats(t *testing.T) {
	out := `[{"ifindex":2,"ifname":"eth0","stats64":{"rx":{"bytes":1234,"packets":3},"tx":{"bytes":5678,"packets":4}}}]`
	got, err := parseIfaceStats([]byte(out))
	if err != nil {
		t.Fatal(err)
	}
	if got != (ifaceStats{rx: 1234, tx: 5678}) {
		t.Fatalf("got %+v", got)
	}
	for _, bad := range []string{`[]`, `[{"ifname":"eth0"}]`, `not json`} {
		if _, err := parseIfaceStats([]byte(bad)); err == nil {
			t.Errorf("%s: no error", bad)
		}
	}
}

func TestWantBurst(t *testing.T) {
	want := func(only string) func(string) bool {
		return func(name string) bool { return only == "" || slices.Contains(strings.Split(only, ","), name) }
	}
	for _, tc := range []struct {
		only string
		runs []string
	}{
		{"", []string{"P5", "P5-1layer"}},
		{"P5", []string{"P5", "P5-1layer"}},
		{"P5-1layer", []string{"P5-1layer"}},
		{"P1,P2", nil},
	} {
		var got []string
		for _, s := range burstSpecs(false) {
			if wantBurst(want(tc.only), s.name) {
				got = append(got, s.name)
			}
		}
		if !slices.Equal(got, tc.runs) {
			t.Errorf("--only %q: %q, want %q", tc.only, got, tc.runs)
		}
	}
}

func TestBurstSpecs(t *testing.T) {
	for _, quick := range []bool{false, true} {
		ss := burstSpecs(quick)
		if len(ss) != 2 {
			t.Fatalf("%d specs", len(ss))
		}
		var sums []int64
		for _, s := range ss {
			var sum int64
			for _, l := range s.layers {
				sum += l
			}
			sums = append(sums, sum)
		}
		if sums[0] != sums[1] {
			t.Errorf("quick %v: P5 %d bytes, P5-1layer %d", quick, sums[0], sums[1])
		}
		if !quick && sums[0] != 128*mib {
			t.Errorf("P5 is %d bytes", sums[0])
		}
	}
	var labels []string
	for _, r := range burstSpecs(false)[1].runs {
		labels = append(labels, r.label)
	}
	if !slices.Equal(labels, []string{"traditional", "stripe", "swarm", "swarm-claim"}) {
		t.Errorf("P5-1layer runs %q", labels)
	}
}

func TestPullError(t *testing.T) {
	err := &harness.CommandError{Args: []string{"/x/bin/ctr", "image", "pull"}, Err: errors.New("exit status 1"),
		Stderr: "first line\nctr: failed to copy: unexpected EOF"}
	if got, want := pullError(fmt.Errorf("pull: %w", err)), "ctr exit status 1: ctr: failed to copy: unexpected EOF"; got != want {
		t.Fatalf("pullError = %q, want %q", got, want)
	}
	if got := pullError(errors.New(strings.Repeat("x", 400))); len(got) > 310 {
		t.Fatalf("%d bytes", len(got))
	}
}
