package content

import "testing"

func TestBounded(t *testing.T) {
	b := NewBounded[string, int](2)
	b.Put("a", 1)
	b.Put("b", 2)
	b.Put("a", 3) // an update: not renewed
	b.Put("c", 4) // evicts the oldest key, a
	if _, ok := b.Get("a"); ok {
		t.Fatal("the oldest key is kept beyond the bound")
	}
	for k, want := range map[string]int{"b": 2, "c": 4} {
		if v, ok := b.Get(k); !ok || v != want {
			t.Fatalf("%s = %d, %v; want %d", k, v, ok, want)
		}
	}
	if b.Len() != 2 {
		t.Fatalf("%d keys; want 2", b.Len())
	}
}
