<CsoundSynthesizer>
; Synthesis instruments for held-out evaluation (and, if ever chosen, training): no samples.
; Every MIDI channel and program plays instrument $INSTR (massign AND pgmassign: otherwise a
; program change in the file picks another instrument). Drum tracks are left out by the caller.
;   1 FM (2-operator, index following the envelope)   2 plucked string (Karplus-Strong)
;   3 subtractive (saw + Moog ladder, filter envelope)  4 additive (four harmonics, organ-like)
<CsOptions>
-d -m0 -T
</CsOptions>
<CsInstruments>
sr = 22050
ksmps = 32
nchnls = 1
0dbfs = 1

massign 0, $INSTR
pgmassign 0, $INSTR

instr 1
  icps cpsmidi
  iamp ampmidi 0.2
  kenv madsr 0.005, 0.3, 0.5, 0.15
  asig foscili iamp * kenv, icps, 1, 2, 1 + 4 * kenv, 1
  out asig
endin

instr 2
  icps cpsmidi
  iamp ampmidi 0.3
  kenv madsr 0.001, 0.05, 0.9, 0.1
  asig pluck iamp, icps, icps, 0, 1
  out asig * kenv
endin

instr 3
  icps cpsmidi
  iamp ampmidi 0.2
  kenv madsr 0.01, 0.25, 0.6, 0.15
  asaw vco2 iamp, icps
  asig moogladder asaw, 300 + 4000 * kenv, 0.3
  out asig * kenv
endin

instr 4
  icps cpsmidi
  iamp ampmidi 0.1
  kenv madsr 0.02, 0.1, 0.9, 0.12
  a1 oscili iamp, icps, 1
  a2 oscili iamp * 0.5, icps * 2, 1
  a3 oscili iamp * 0.3, icps * 3, 1
  a4 oscili iamp * 0.2, icps * 4, 1
  out (a1 + a2 + a3 + a4) * kenv
endin
</CsInstruments>
<CsScore>
f1 0 16384 10 1
f0 36000
</CsScore>
</CsoundSynthesizer>
