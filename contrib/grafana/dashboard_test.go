// Package grafana_test keeps contrib/grafana/coop.json honest: every coop_
// metric it queries is defined in the Go sources, and the metrics an operator
// needs first are on it.
package grafana_test

import (
	"encoding/json"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
)

// important metrics: the dashboard must show them.
var important = []string{
	"coop_mirror_peer_bytes_total",
	"coop_peer_served_bytes_total",
	"coop_registry_bytes_total",
	"coop_claims_total",
}

type panel struct {
	Type    string  `json:"type"`
	Title   string  `json:"title"`
	Panels  []panel `json:"panels"` // a collapsed row's panels
	Targets []struct {
		Expr string `json:"expr"`
	} `json:"targets"`
	GridPos struct {
		X, Y, W, H int
	} `json:"gridPos"`
}

type dashboard struct {
	Title         string  `json:"title"`
	SchemaVersion int     `json:"schemaVersion"`
	Panels        []panel `json:"panels"`
}

var metricName = regexp.MustCompile(`coop_[a-z_]+`)

// exprs returns every query of the dashboard, by panel title.
func exprs(t *testing.T, d dashboard) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	var walk func([]panel)
	walk = func(ps []panel) {
		for _, p := range ps {
			walk(p.Panels)
			if p.Type == "row" {
				continue
			}
			if len(p.Targets) == 0 {
				t.Errorf("panel %q has no targets", p.Title)
			}
			if p.GridPos.W <= 0 || p.GridPos.H <= 0 || p.GridPos.X+p.GridPos.W > 24 {
				t.Errorf("panel %q: gridPos %+v does not fit the 24-column grid", p.Title, p.GridPos)
			}
			for _, tg := range p.Targets {
				if strings.TrimSpace(tg.Expr) == "" {
					t.Errorf("panel %q has an empty query", p.Title)
				}
				out[p.Title] = append(out[p.Title], tg.Expr)
			}
		}
	}
	walk(d.Panels)
	return out
}

// moduleRoot walks up from the test's directory to go.mod.
func moduleRoot(t *testing.T) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("no go.mod above the test's directory")
		}
		dir = parent
	}
}

// sources returns the module's non-test Go sources, concatenated.
func sources(t *testing.T, root string) string {
	t.Helper()
	var b strings.Builder
	files := 0
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if path != root && (strings.HasPrefix(d.Name(), ".") || d.Name() == "vendor" || d.Name() == "testdata") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(path, ".go") || strings.HasSuffix(path, "_test.go") {
			return nil
		}
		src, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		files++
		b.Write(src)
		b.WriteByte('\n')
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if files < 10 {
		t.Fatalf("only %d Go files under %s: not the module", files, root)
	}
	return b.String()
}

// defined tells whether a metric (or the histogram a _bucket/_sum/_count
// series belongs to) is defined in src: `Name: "coop_…"` in its Opts.
func defined(src, name string) bool {
	names := []string{name}
	for _, suf := range []string{"_bucket", "_sum", "_count"} {
		if base, ok := strings.CutSuffix(name, suf); ok {
			names = append(names, base)
		}
	}
	for _, n := range names {
		if regexp.MustCompile(`Name:\s*"` + regexp.QuoteMeta(n) + `"`).MatchString(src) {
			return true
		}
	}
	return false
}

func TestDashboardMetricsExist(t *testing.T) {
	raw, err := os.ReadFile("coop.json")
	if err != nil {
		t.Fatal(err)
	}
	var d dashboard
	if err := json.Unmarshal(raw, &d); err != nil {
		t.Fatalf("coop.json: %v", err)
	}
	if d.Title == "" || d.SchemaVersion == 0 || len(d.Panels) == 0 {
		t.Fatalf("coop.json: title %q, schemaVersion %d, %d panels: not a dashboard", d.Title, d.SchemaVersion, len(d.Panels))
	}
	var tree any
	if err := json.Unmarshal(raw, &tree); err != nil {
		t.Fatal(err)
	}
	checkDatasources(t, tree)
	used := map[string][]string{} // metric → panels
	for title, es := range exprs(t, d) {
		for _, e := range es {
			for _, m := range metricName.FindAllString(e, -1) {
				used[m] = append(used[m], title)
			}
		}
	}
	if len(used) == 0 {
		t.Fatal("coop.json queries no coop_ metric")
	}
	src := sources(t, moduleRoot(t))
	names := make([]string, 0, len(used))
	for m := range used {
		names = append(names, m)
	}
	sort.Strings(names)
	for _, m := range names {
		if !defined(src, m) {
			t.Errorf("coop.json queries %s (panels %q), which no Go source defines", m, used[m])
		}
	}
	for _, m := range important {
		if len(used[m]) == 0 {
			t.Errorf("coop.json does not show %s", m)
		}
	}
}

// checkDatasources fails on a datasource other than the ${datasource}
// variable (or Grafana's own, for annotations): no hard-coded UID.
func checkDatasources(t *testing.T, v any) {
	t.Helper()
	switch v := v.(type) {
	case map[string]any:
		for k, c := range v {
			if ds, ok := c.(map[string]any); ok && k == "datasource" {
				if uid := ds["uid"]; uid != "${datasource}" && uid != "-- Grafana --" {
					t.Errorf("coop.json: datasource uid %v: use the ${datasource} variable", uid)
				}
			}
			checkDatasources(t, c)
		}
	case []any:
		for _, c := range v {
			checkDatasources(t, c)
		}
	}
}

func TestDefined(t *testing.T) {
	src := `prometheus.HistogramOpts{
		Name:    "coop_x_seconds",
	}
	CounterOpts{Name: "coop_y_total", Help: "…"}
	status := metrics.sum("coop_z_total")`
	for name, want := range map[string]bool{
		"coop_x_seconds": true, "coop_x_seconds_bucket": true, "coop_x_seconds_count": true,
		"coop_y_total": true, "coop_y_total_sum": true,
		"coop_z_total": false, "coop_x": false, "coop_y_totals": false,
	} {
		if got := defined(src, name); got != want {
			t.Errorf("defined(%s) = %v, want %v", name, got, want)
		}
	}
}
