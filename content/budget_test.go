package content

import (
	"testing"

	"github.com/containerd/errdefs"
)

func TestBudget(t *testing.T) {
	for _, tc := range []struct {
		name    string
		max     int64
		free    int64
		reserve []int64
		wantOK  []bool
	}{
		{"within the maximum", 100, 1000, []int64{60, 40}, []bool{true, true}},
		{"beyond the maximum", 100, 1000, []int64{60, 41, 40}, []bool{true, false, true}},
		{"beyond the free space", 1000, 100, []int64{60, 41, 40}, []bool{true, false, true}},
		{"one blob larger than the maximum", 100, 1000, []int64{101}, []bool{false}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := NewBudget(BudgetOptions{Max: tc.max})
			if err != nil {
				t.Fatal(err)
			}
			b.free = func() (int64, error) { return tc.free, nil }
			var releases []func()
			var want int64
			for i, n := range tc.reserve {
				rel, err := b.Reserve(n)
				if tc.wantOK[i] != (err == nil) {
					t.Fatalf("Reserve(%d) #%d: %v; want ok=%v", n, i, err, tc.wantOK[i])
				}
				if err != nil {
					if !errdefs.IsResourceExhausted(err) {
						t.Fatalf("Reserve(%d): %v; want ErrResourceExhausted", n, err)
					}
					continue
				}
				want += n
				releases = append(releases, rel)
			}
			if b.Used() != want {
				t.Fatalf("used %d, want %d", b.Used(), want)
			}
			for _, rel := range releases {
				rel()
				rel() // twice is once
			}
			if b.Used() != 0 {
				t.Fatalf("used %d after every release, want 0", b.Used())
			}
		})
	}
}

func TestBudgetDefaults(t *testing.T) {
	if _, err := NewBudget(BudgetOptions{Max: -1}); !errdefs.IsInvalidArgument(err) {
		t.Fatalf("negative maximum: %v; want ErrInvalidArgument", err)
	}
	b, err := NewBudget(BudgetOptions{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if b.max != DefaultMaxUnverified {
		t.Fatalf("max %d, want the default %d", b.max, DefaultMaxUnverified)
	}
	free, err := b.free()
	if err != nil || free <= 0 {
		t.Fatalf("free space of a temp dir: %d, %v", free, err)
	}
	if _, err := b.Reserve(free + 1); !errdefs.IsResourceExhausted(err) {
		t.Fatalf("reserving more than the free space: %v; want ErrResourceExhausted", err)
	}
	var nilBudget *Budget
	rel, err := nilBudget.Reserve(1 << 62)
	if err != nil {
		t.Fatalf("a nil budget refused: %v", err)
	}
	rel()
}
