# Shells on the serial console reach the desktop too.
export DISPLAY=:0
