# An attribute without its "=": the HCL parser stops on line 7.
job "malformed" {
  group "vm" {
    task "virtual" {
      driver = "qemu"
      config {
        image_path "local/linux.img"
        port_map {
          ssh = 22
        }
      }
    }
  }
}
