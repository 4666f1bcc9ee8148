// Package layering checks that coop's imports point one way: content ←
// peers ← resolver ← plugin ← cmd, and inside resolver and plugin from the
// parts to what assembles them; nothing imports cmd or test.
package layering

import (
	"bufio"
	"bytes"
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/coopnet/coop"

// ranks: a package may import only packages of a lower rank. The longest
// matching prefix decides.
var ranks = []struct {
	prefix string
	rank   int
}{
	{"contrib/image", 5}, // builds coop's image with go build; imports nothing of coop
	{"content", 10},
	{"peers/trust", 15},
	{"peers", 20},
	{"resolver", 30},
	{"resolver/resolvertest", 31},
	{"resolver/clusterkb", 32},
	{"resolver/modes", 33},
	{"plugin", 40},
	{"plugin/upstream", 40}, // beside plugin: the registries claims fall back to
	{"plugin/mirror", 41},
	{"plugin/migrate", 42},
	{"plugin/node", 43},
	{"cmd", 50},
	{"contrib/grafana", 55},
	{"test", testRank},
}

// testRank is the tests' rank: they may import one another.
const testRank = 60

func rankOf(pkg string) (int, bool) {
	rel, ok := strings.CutPrefix(pkg, module+"/")
	if !ok {
		return 0, false
	}
	best, bestLen := -1, -1
	for _, r := range ranks {
		if (rel == r.prefix || strings.HasPrefix(rel, r.prefix+"/")) && len(r.prefix) > bestLen {
			best, bestLen = r.rank, len(r.prefix)
		}
	}
	return best, best >= 0
}

func TestImportsPointOneWay(t *testing.T) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		// go test puts its own go first on PATH; this is a go run by hand.
		goBin = "/usr/local/go/bin/go"
	}
	cmd := exec.Command(goBin, "list", "-tags", "integration", "-f", `{{.ImportPath}} {{join .Imports " "}}`, "./...")
	cmd.Dir = "../.."
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v: %s", err, stderr.String())
	}
	checked := 0
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		pkg := fields[0]
		from, ok := rankOf(pkg)
		if !ok {
			t.Errorf("package %s has no place in the layering: add it to ranks", pkg)
			continue
		}
		checked++
		for _, imp := range fields[1:] {
			to, ok := rankOf(imp)
			if !ok || imp == pkg {
				continue
			}
			if to >= from && (from != testRank || to != testRank) {
				t.Errorf("%s imports %s: imports must point down the layers (content ← peers ← resolver ← plugin ← cmd)", pkg, imp)
			}
		}
	}
	if checked < 10 {
		t.Fatalf("only %d packages listed: go list did not see the module", checked)
	}
}

func TestRankOf(t *testing.T) {
	for _, tc := range []struct {
		pkg  string
		want int
		ok   bool
	}{
		{module + "/content", 10, true},
		{module + "/resolver/clusterkb", 32, true},
		{module + "/plugin/mirror", 41, true},
		{module + "/plugin", 40, true},
		{module + "/pluginx", 0, false},
		{module + "/test/e2e", 60, true},
		{"github.com/containerd/containerd/v2/client", 0, false},
	} {
		got, ok := rankOf(tc.pkg)
		if ok != tc.ok || (ok && got != tc.want) {
			t.Errorf("rankOf(%s) = %d, %v; want %d, %v", tc.pkg, got, ok, tc.want, tc.ok)
		}
	}
}
