package harness

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/coopnet/coop/plugin/node"
	digest "github.com/opencontainers/go-digest"
)

// The coop peer API as the harness sees it from outside (its own types, so
// the tests check the wire format rather than share coop's structs).
const (
	inventoryPath = "/coop/v1/inventory"
	havePath      = "/coop/v1/have"
	metricsPath   = "/metrics"
)

// InventoryBlob is one blob in an inventory or a have answer.
type InventoryBlob struct {
	Digest digest.Digest `json:"digest"`
	Size   int64         `json:"size"`
}

// Inventory is the body of GET /coop/v1/inventory and of a have answer.
type Inventory struct {
	Node  string          `json:"node"`
	Epoch string          `json:"epoch"`
	Seq   uint64          `json:"seq"`
	Blobs []InventoryBlob `json:"blobs"`
}

// Size returns the size listed for dgst, and whether it is listed.
func (inv *Inventory) Size(dgst digest.Digest) (int64, bool) {
	for _, b := range inv.Blobs {
		if b.Digest == dgst {
			return b.Size, true
		}
	}
	return 0, false
}

// Has reports whether dgst is listed.
func (inv *Inventory) Has(dgst digest.Digest) bool {
	_, ok := inv.Size(dgst)
	return ok
}

// Digests returns the listed digests, sorted.
func (inv *Inventory) Digests() []digest.Digest {
	var ds []digest.Digest
	for _, b := range inv.Blobs {
		ds = append(ds, b.Digest)
	}
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	return ds
}

// FetchInventory GETs peerURL/coop/v1/inventory.
func FetchInventory(ctx context.Context, c *http.Client, peerURL string) (*Inventory, error) {
	var inv Inventory
	if err := doJSON(ctx, c, http.MethodGet, peerURL+inventoryPath, nil, &inv); err != nil {
		return nil, err
	}
	return &inv, nil
}

// FetchHave POSTs dgsts to peerURL/coop/v1/have and returns the answer: the
// blobs the peer holds among them.
func FetchHave(ctx context.Context, c *http.Client, peerURL string, dgsts []digest.Digest) (*Inventory, error) {
	body, err := json.Marshal(struct {
		Digests []digest.Digest `json:"digests"`
	}{dgsts})
	if err != nil {
		return nil, err
	}
	var inv Inventory
	if err := doJSON(ctx, c, http.MethodPost, peerURL+havePath, body, &inv); err != nil {
		return nil, err
	}
	return &inv, nil
}

func doJSON(ctx context.Context, c *http.Client, method, url string, body []byte, out any) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, url, rd)
	if err != nil {
		return err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return fmt.Errorf("%s %s: %w", method, url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s %s: %s: %s", method, url, resp.Status, strings.TrimSpace(string(b)))
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("%s %s: bad JSON: %w", method, url, err)
	}
	return nil
}

// Sample is one Prometheus sample.
type Sample struct {
	Name   string
	Labels map[string]string
	Value  float64
}

// Metrics are the samples of one /metrics scrape.
type Metrics []Sample

// Sum adds the values of the samples named name whose labels include every
// pair of labelPairs ("key", "value", ...), and says whether any matched.
func (m Metrics) Sum(name string, labelPairs ...string) (float64, bool) {
	var sum float64
	found := false
	for _, s := range m {
		if s.Name != name || !hasLabels(s.Labels, labelPairs) {
			continue
		}
		sum += s.Value
		found = true
	}
	return sum, found
}

// Series returns the samples named name, formatted one per line (for error
// messages).
func (m Metrics) Series(name string) string {
	var lines []string
	for _, s := range m {
		if s.Name == name {
			lines = append(lines, fmt.Sprintf("%s%v %g", s.Name, s.Labels, s.Value))
		}
	}
	if len(lines) == 0 {
		return "(no " + name + " series)"
	}
	return strings.Join(lines, "\n")
}

func hasLabels(have map[string]string, pairs []string) bool {
	for i := 0; i+1 < len(pairs); i += 2 {
		if have[pairs[i]] != pairs[i+1] {
			return false
		}
	}
	return true
}

// FetchMetrics scrapes url (a peer URL; /metrics is appended unless url
// already ends with it) and parses the Prometheus text format.
func FetchMetrics(ctx context.Context, c *http.Client, url string) (Metrics, error) {
	if !strings.HasSuffix(url, metricsPath) {
		url += metricsPath
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, err
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return ParseMetrics(io.LimitReader(resp.Body, 64<<20))
}

// ParseMetrics parses the Prometheus text exposition format (comments and
// timestamps ignored).
func ParseMetrics(r io.Reader) (Metrics, error) {
	var m Metrics
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for ln := 1; sc.Scan(); ln++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		s, err := parseSample(line)
		if err != nil {
			return nil, fmt.Errorf("metrics line %d %q: %w", ln, line, err)
		}
		m = append(m, s)
	}
	return m, sc.Err()
}

func parseSample(line string) (Sample, error) {
	s := Sample{Labels: map[string]string{}}
	i := strings.IndexAny(line, "{ \t")
	if i <= 0 {
		return s, fmt.Errorf("no value")
	}
	s.Name = line[:i]
	rest := line[i:]
	if rest[0] == '{' {
		rest = rest[1:]
		for {
			rest = strings.TrimLeft(rest, " ,")
			if strings.HasPrefix(rest, "}") {
				rest = rest[1:]
				break
			}
			eq := strings.IndexByte(rest, '=')
			if eq <= 0 || eq+1 >= len(rest) || rest[eq+1] != '"' {
				return s, fmt.Errorf("bad label")
			}
			key := strings.TrimSpace(rest[:eq])
			rest = rest[eq+2:]
			var val strings.Builder
			closed := false
			for j := 0; j < len(rest); j++ {
				c := rest[j]
				if c == '\\' && j+1 < len(rest) {
					j++
					switch rest[j] {
					case 'n':
						val.WriteByte('\n')
					default:
						val.WriteByte(rest[j])
					}
					continue
				}
				if c == '"' {
					rest = rest[j+1:]
					closed = true
					break
				}
				val.WriteByte(c)
			}
			if !closed {
				return s, fmt.Errorf("unterminated label value")
			}
			s.Labels[key] = val.String()
		}
	}
	f := strings.Fields(rest)
	if len(f) == 0 {
		return s, fmt.Errorf("no value")
	}
	v, err := strconv.ParseFloat(f[0], 64)
	if err != nil {
		return s, err
	}
	s.Value = v
	return s, nil
}

// Inventory fetches the node's /coop/v1/inventory.
func (n *Node) Inventory(ctx context.Context) (*Inventory, error) {
	return FetchInventory(ctx, n.http, n.PeerURL())
}

// Have asks the node's /coop/v1/have about dgsts.
func (n *Node) Have(ctx context.Context, dgsts []digest.Digest) (*Inventory, error) {
	return FetchHave(ctx, n.http, n.PeerURL(), dgsts)
}

// Metrics scrapes the node's /metrics.
func (n *Node) Metrics(ctx context.Context) (Metrics, error) {
	return FetchMetrics(ctx, n.http, n.PeerURL())
}

// Metric returns the sum of the node's samples named name with the given
// label pairs; a series never incremented (absent) counts as 0.
func (n *Node) Metric(ctx context.Context, name string, labelPairs ...string) (float64, error) {
	m, err := n.Metrics(ctx)
	if err != nil {
		return 0, err
	}
	v, _ := m.Sum(name, labelPairs...)
	return v, nil
}

// Metric names coop exposes that the tests use.
const (
	MetricPeerServedBytes = "coop_peer_served_bytes_total"
	MetricMirrorRequests  = "coop_mirror_requests_total"
	MetricActiveUploads   = "coop_peer_active_uploads"
	// MetricMirrorPeerBytes counts the bytes the mirror and the claims
	// received from each peer.
	MetricMirrorPeerBytes = "coop_mirror_peer_bytes_total"
)

// Locate asks n's mirror which peers hold dgsts (/coop/v1/locate, through
// coop locate inside the node's network namespace when it has one): the
// node count per digest.
func (n *Node) Locate(ctx context.Context, dgsts []digest.Digest) (map[digest.Digest]int, error) {
	if n.tools.Coop == "" {
		return nil, errors.New("locate needs bin/coop")
	}
	args := []string{"locate", "--node", n.MirrorURL(), "--json"}
	for _, d := range dgsts {
		args = append(args, d.String())
	}
	out, err := n.InNetNS(ctx, n.tools.Coop, args...)
	if err != nil {
		return nil, err
	}
	var rows []struct {
		Digest digest.Digest `json:"digest"`
	}
	if err := json.Unmarshal([]byte(out), &rows); err != nil {
		return nil, fmt.Errorf("coop locate: %w: %q", err, out)
	}
	got := map[digest.Digest]int{}
	for _, r := range rows {
		got[r.Digest]++
	}
	return got, nil
}

// Metric names of claim mode.
const (
	MetricClaims = "coop_claims_total"
	// MetricClaimFallbacks counts the claims the registry completed.
	MetricClaimFallbacks = "coop_claim_registry_fallbacks_total"
	// MetricClaimDecisions counts claim decisions by their fallback.
	MetricClaimDecisions = "coop_claim_decisions_total"
)

// Status runs `coop status --json` against the node (in its network
// namespace) and returns the status it printed and its exit status (0: fine,
// 1: problems, 2: no node). err is set only when the command could not run or
// printed no status.
func (n *Node) Status(ctx context.Context) (node.Status, int, error) {
	var s node.Status
	if n.tools.Coop == "" {
		return s, 0, errors.New("status needs bin/coop")
	}
	out, err := n.InNetNS(ctx, n.tools.Coop, "status", "--json", "--node", n.MirrorURL())
	code := 0
	if err != nil {
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			return s, 0, err
		}
		code = ee.ExitCode()
	}
	if code == 2 {
		return s, code, nil
	}
	if jerr := json.Unmarshal([]byte(out), &s); jerr != nil {
		return s, code, fmt.Errorf("coop status printed no status (%v): %w", err, jerr)
	}
	return s, code, nil
}
