package main

import (
	"fmt"
	"image/color"
	"os"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
)

// destColors are the destinations' bar colours, in order (d1..d8).
var destColors = []color.Color{
	color.RGBA{31, 119, 180, 255},
	color.RGBA{255, 127, 14, 255},
	color.RGBA{44, 160, 44, 255},
	color.RGBA{214, 39, 40, 255},
	color.RGBA{148, 103, 189, 255},
	color.RGBA{140, 86, 75, 255},
	color.RGBA{227, 119, 194, 255},
	color.RGBA{188, 189, 34, 255},
}

var (
	sourceColor  = color.RGBA{110, 110, 110, 255}
	corruptColor = color.RGBA{60, 30, 30, 255}
	refColor     = color.RGBA{160, 30, 30, 255}
)

// barSeries is one bar per group: its legend name, colour, values by group
// and, where set, a mark drawn at the foot of a group's bar (a killed
// destination has no bar).
type barSeries struct {
	name   string
	color  color.Color
	values []float64
	marks  []string
}

// refLine is a horizontal reference line across every group.
type refLine struct {
	name   string
	y      float64
	dashes []vg.Length
}

// groupedBars adds series side by side in each of groups groups (at X 0, 1,
// ...), each bar w wide, the values over the bars, and the reference
// lines, with a legend.
func groupedBars(p *plot.Plot, groups int, series []barSeries, refs []refLine, w vg.Length, valueFormat string) error {
	for _, r := range refs {
		line, err := plotter.NewLine(plotter.XYs{{X: -0.5, Y: r.y}, {X: float64(groups) - 0.5, Y: r.y}})
		if err != nil {
			return err
		}
		line.Color = refColor
		line.Dashes = r.dashes
		p.Add(line)
		p.Legend.Add(r.name, line)
	}
	for i, s := range series {
		bars, err := plotter.NewBarChart(plotter.Values(s.values), w)
		if err != nil {
			return err
		}
		bars.Color = s.color
		bars.LineStyle.Width = 0
		bars.Offset = vg.Length(float64(i)-float64(len(series)-1)/2) * w
		p.Add(bars)
		p.Legend.Add(s.name, bars)
		var pts plotter.XYs
		var texts []string
		for g, v := range s.values {
			switch {
			case g < len(s.marks) && s.marks[g] != "":
				pts = append(pts, plotter.XY{X: float64(g), Y: 0})
				texts = append(texts, s.marks[g])
			case v > 0 && valueFormat != "":
				pts = append(pts, plotter.XY{X: float64(g), Y: v})
				texts = append(texts, fmt.Sprintf(valueFormat, v))
			}
		}
		if err := addBarLabels(p, bars, pts, texts); err != nil {
			return err
		}
	}
	p.Legend.Top = true
	return nil
}

// plotBurst draws a burst scenario to a PNG: above, the seconds each
// destination took in each run (the limit and the target as lines; × marks
// a killed destination, ! one that did not complete); below, the MiB each
// uplink sent in each run (the source's: registry and coop node; each
// destination's peer server; the corrupt holder's), against the image and
// the target.
func plotBurst(path string, s Scenario) error {
	if len(s.Runs) == 0 {
		return nil
	}
	names := sortedDestNames(s)
	var labels []string
	for _, r := range s.Runs {
		labels = append(labels, r.Label)
	}
	groups := len(labels)
	destOf := func(r Run, name string) (BurstDest, bool) {
		for _, d := range r.Destinations {
			if d.Name == name {
				return d, true
			}
		}
		return BurstDest{}, false
	}
	// The time panel: one bar per destination.
	var timeSeries []barSeries
	for i, name := range names {
		bs := barSeries{name: name, color: destColors[i%len(destColors)], values: make([]float64, groups), marks: make([]string, groups)}
		for g, r := range s.Runs {
			d, ok := destOf(r, name)
			switch {
			case !ok:
			case d.Killed:
				bs.marks[g] = "×"
			case d.Seconds == 0:
				bs.marks[g] = "!"
			default:
				bs.values[g] = d.Seconds
			}
		}
		timeSeries = append(timeSeries, bs)
	}
	// The bytes panel: the source, the destinations, the corrupt holder.
	imageMiB := float64(s.Bytes) / mib
	src := barSeries{name: "source (registry + coop)", color: sourceColor, values: make([]float64, groups)}
	bad := barSeries{name: "corrupt holder", color: corruptColor, values: make([]float64, groups)}
	anyBad := false
	for g, r := range s.Runs {
		src.values[g] = float64(r.SourceBytes) / mib
		bad.values[g] = float64(r.CorruptHolderServed) / mib
		anyBad = anyBad || r.CorruptHolderServed > 0
		if imageMiB == 0 {
			imageMiB = float64(r.ImageBytes) / mib
		}
	}
	byteSeries := []barSeries{src}
	for i, name := range names {
		bs := barSeries{name: name, color: destColors[i%len(destColors)], values: make([]float64, groups)}
		for g, r := range s.Runs {
			if d, ok := destOf(r, name); ok {
				bs.values[g] = float64(d.Uploaded) / mib
			}
		}
		byteSeries = append(byteSeries, bs)
	}
	if anyBad {
		byteSeries = append(byteSeries, bad)
	}

	const barPt, groupFill = 9, 0.75
	bars := max(len(timeSeries), len(byteSeries))
	w := vg.Points(barPt)
	groupPt := float64(bars) * barPt / groupFill
	legendUnits := 1.3
	width := vg.Points(max(600, 80+groupPt*(float64(groups)+legendUnits)))
	dashed := []vg.Length{vg.Points(4), vg.Points(3)}
	dotted := []vg.Length{vg.Points(1), vg.Points(2)}

	top := plot.New()
	top.Title.Text = fmt.Sprintf("%s: seconds until each destination's pull returned (limit %.1f s: the image over one %d Mbit/s uplink)", s.Name, s.LimitSeconds, burstMbit)
	top.Y.Label.Text = "seconds"
	top.Y.Min = 0
	err := groupedBars(top, groups, timeSeries, []refLine{
		{name: "limit", y: s.LimitSeconds},
		{name: fmt.Sprintf("%.1f× limit (target)", burstTimeTarget), y: burstTimeTarget * s.LimitSeconds, dashes: dashed},
	}, w, "")
	if err != nil {
		return err
	}
	bottom := plot.New()
	bottom.Title.Text = fmt.Sprintf("%s: MiB sent up each uplink (image %.0f MiB)", s.Name, imageMiB)
	bottom.Y.Label.Text = "MiB"
	bottom.Y.Min = 0
	err = groupedBars(bottom, groups, byteSeries, []refLine{
		{name: "one image", y: imageMiB, dashes: dotted},
		{name: fmt.Sprintf("%.1f images (target)", burstSourceTarget), y: burstSourceTarget * imageMiB, dashes: dashed},
	}, w, "")
	if err != nil {
		return err
	}
	for _, p := range []*plot.Plot{top, bottom} {
		p.NominalX(labels...)
		p.X.Min, p.X.Max = -0.5, float64(groups)-0.5+legendUnits
	}

	height := 7 * vg.Inch
	img := vgimg.New(width, height)
	dc := draw.New(img)
	tiles := draw.Tiles{Rows: 2, Cols: 1, PadTop: vg.Points(4), PadBottom: vg.Points(4), PadLeft: vg.Points(4), PadRight: vg.Points(8), PadY: vg.Points(14)}
	canvases := plot.Align([][]*plot.Plot{{top}, {bottom}}, tiles, dc)
	top.Draw(canvases[0][0])
	bottom.Draw(canvases[1][0])
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	if _, err := (vgimg.PngCanvas{Canvas: img}).WriteTo(f); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}
